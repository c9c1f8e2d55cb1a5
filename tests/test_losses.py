"""Tests of `hf_distill.distillation_loss` and its helpers against an independent NumPy float64 reference.

The reference (tests/reference.py) is written from the mathematical definitions and never calls the package. With
p = softmax(teacher / T) and q = softmax(student / T):

- forward_kl: T²·KL(p‖q); reverse_kl: T²·KL(q‖p)
- jsd: T²·[β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q; β=0 → T²·KL(p‖q), β=1 → T²·KL(q‖p)
- skew_kl: T²·KL(p ‖ skew·p + (1−skew)·q); skew_reverse_kl: T²·KL(q ‖ (1−skew)·p + skew·q)
- tvd: ½·Σ|p−q|; mse: mean (student−teacher)² on raw logits; cosine: 1 − cos(student, teacher) on raw logits.

The package computes in float32 whatever the input dtype, so comparisons use float32-level tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hf_distill
from hf_distill import LOSS_TYPES, distillation_loss
from hf_distill.loss import cross_entropy_per_position, token_divergence

from reference import (
    LOSS_CASE_IDS,
    LOSS_CASES,
    np_cross_entropy,
    np_distillation_loss,
    np_divergence,
    np_log_softmax,
    np_numerical_grad,
)

TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
PROBABILITY_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


def random_logits(shape, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def as_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def backward_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∂loss/∂x; a loss that does not depend on x at all (skew_kl with skew=1 is KL(p‖p) = 0, which
    currently comes back without a grad_fn, see test_degenerate_skew_kl_keeps_a_grad_fn) counts as zero."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    loss.backward()
    return x.grad


def assert_close_scalar(actual: torch.Tensor, expected: float, rtol=2e-5, atol=1e-6):
    assert actual.dim() == 0
    value = actual.item()
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=rtol, abs=atol), (value, expected)


# --------------------------------------------------------------------------------------------------
# Sanity checks of the reference itself (so a wrong reference cannot make wrong code pass)
# --------------------------------------------------------------------------------------------------


def test_reference_matches_hand_computed_kl():
    # Two-class example: p = (0.25, 0.75), q = (0.5, 0.5) at T=1.
    teacher = np.log(np.array([[0.25, 0.75]]))
    student = np.log(np.array([[0.5, 0.5]]))
    expected_fwd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    expected_rev = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert np_divergence(student, teacher, "forward_kl")[0] == pytest.approx(expected_fwd, rel=1e-12)
    assert np_divergence(student, teacher, "reverse_kl")[0] == pytest.approx(expected_rev, rel=1e-12)
    m = 0.5 * np.array([0.25, 0.75]) + 0.5 * np.array([0.5, 0.5])
    expected_jsd = 0.5 * np.sum([0.25, 0.75] * np.log(np.array([0.25, 0.75]) / m)) + 0.5 * np.sum(
        [0.5, 0.5] * np.log(np.array([0.5, 0.5]) / m)
    )
    assert np_divergence(student, teacher, "jsd", beta=0.5)[0] == pytest.approx(expected_jsd, rel=1e-12)
    assert np_divergence(student, teacher, "tvd")[0] == pytest.approx(0.25, rel=1e-12)
    # Temperature 2 on the same logits: T² times the KL of the tempered distributions.
    pt = np.array([0.25, 0.75]) ** 0.5
    pt /= pt.sum()
    expected_t2 = 4.0 * np.sum(pt * np.log(pt / 0.5))
    assert np_divergence(student, teacher, "forward_kl", temperature=2.0)[0] == pytest.approx(expected_t2, rel=1e-12)


def test_reference_skew_mixtures_reduce_to_plain_kl():
    s, t = np.random.default_rng(0).normal(size=(2, 3, 9))
    fwd = np_divergence(s, t, "forward_kl")
    rev = np_divergence(s, t, "reverse_kl")
    np.testing.assert_allclose(np_divergence(s, t, "skew_kl", skew=0.0), fwd, rtol=1e-12)
    np.testing.assert_allclose(np_divergence(s, t, "skew_reverse_kl", skew=0.0), rev, rtol=1e-12)
    np.testing.assert_allclose(np_divergence(s, t, "skew_kl", skew=1.0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np_divergence(s, t, "skew_reverse_kl", skew=1.0), 0.0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Values against the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_matches_reference_2d(loss_type, kwargs):
    student = random_logits((6, 11), seed=1)
    teacher = random_logits((6, 11), seed=2)
    for temperature in TEMPERATURES:
        actual = distillation_loss(student, teacher, loss_type=loss_type, temperature=temperature, **kwargs)
        expected = np_distillation_loss(
            as_np(student), as_np(teacher), loss_type=loss_type, temperature=temperature, **kwargs
        )
        assert actual.dtype == torch.float32
        assert_close_scalar(actual, expected)


@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_token_divergence_per_position_3d(loss_type, kwargs):
    student = random_logits((2, 5, 13), seed=3, dtype=torch.float64)
    teacher = random_logits((2, 5, 13), seed=4, dtype=torch.float64)
    for temperature in TEMPERATURES:
        values = token_divergence(student, teacher, loss_type=loss_type, temperature=temperature, **kwargs)
        assert values.shape == (2, 5)
        assert values.dtype == torch.float32  # documented: float32 whatever the input dtype
        expected = np_divergence(as_np(student), as_np(teacher), loss_type, temperature=temperature, **kwargs)
        np.testing.assert_allclose(as_np(values), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("ignore_index", (-100, 7))
@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_masked_mean_3d(loss_type, kwargs, ignore_index):
    batch, seq, vocab = 3, 7, 10
    student = random_logits((batch, seq, vocab), seed=5)
    teacher = random_logits((batch, seq, vocab), seed=6)
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[labels == ignore_index] = 0  # only the positions chosen below are ignored
    drop = torch.rand((batch, seq), generator=gen) < 0.4
    drop[0, 0], drop[0, 1] = True, False  # at least one of each
    labels[drop] = ignore_index
    actual = distillation_loss(
        student, teacher, labels, loss_type=loss_type, temperature=2.0, ignore_index=ignore_index, **kwargs
    )
    expected = np_distillation_loss(
        as_np(student), as_np(teacher), labels.numpy(), ignore_index, loss_type=loss_type, temperature=2.0, **kwargs
    )
    assert_close_scalar(actual, expected)
    # The ignored positions really are ignored: changing them changes nothing.
    student2, teacher2 = student.clone(), teacher.clone()
    student2[drop] = random_logits(student2[drop].shape, seed=8, scale=10.0)
    teacher2[drop] = random_logits(teacher2[drop].shape, seed=9, scale=10.0)
    again = distillation_loss(
        student2, teacher2, labels, loss_type=loss_type, temperature=2.0, ignore_index=ignore_index, **kwargs
    )
    torch.testing.assert_close(again, actual, rtol=1e-6, atol=1e-7)


def test_default_ignore_index_is_minus_100_and_other_labels_count():
    student = random_logits((2, 4, 6), seed=10)
    teacher = random_logits((2, 4, 6), seed=11)
    labels = torch.tensor([[-100, 3, -1, 0], [5, -100, -100, 2]])  # -1 is a real (counted) label here
    actual = distillation_loss(student, teacher, labels, loss_type="forward_kl")
    expected = np_distillation_loss(as_np(student), as_np(teacher), labels.numpy(), -100, loss_type="forward_kl")
    assert_close_scalar(actual, expected)


def test_labels_none_averages_every_position_3d():
    student = random_logits((2, 3, 8), seed=12)
    teacher = random_logits((2, 3, 8), seed=13)
    actual = distillation_loss(student, teacher, None, loss_type="reverse_kl", temperature=1.5)
    values = np_divergence(as_np(student), as_np(teacher), "reverse_kl", temperature=1.5)
    assert_close_scalar(actual, float(values.mean()))


def test_public_export():
    assert hf_distill.distillation_loss is distillation_loss
    assert set(LOSS_TYPES) == {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse", "cosine"}


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student = random_logits((5, 9), seed=14)
    teacher = random_logits((5, 9), seed=15)
    for temperature in TEMPERATURES:
        fwd = distillation_loss(student, teacher, loss_type="forward_kl", temperature=temperature)
        rev = distillation_loss(student, teacher, loss_type="reverse_kl", temperature=temperature)
        jsd0 = distillation_loss(student, teacher, loss_type="jsd", beta=0.0, temperature=temperature)
        jsd1 = distillation_loss(student, teacher, loss_type="jsd", beta=1.0, temperature=temperature)
        torch.testing.assert_close(jsd0, fwd, rtol=0, atol=0)
        torch.testing.assert_close(jsd1, rev, rtol=0, atol=0)
        # Interior values stay bounded by T²·log 2 ... and are far from the endpoints' degenerate 0.
        mid = distillation_loss(student, teacher, loss_type="jsd", beta=0.5, temperature=temperature)
        assert 0 < mid.item() <= temperature**2 * math.log(2) + 1e-6


def test_temperature_does_not_affect_raw_logit_losses():
    student = random_logits((4, 7), seed=16)
    teacher = random_logits((4, 7), seed=17)
    for loss_type in ("mse", "cosine"):
        base = distillation_loss(student, teacher, loss_type=loss_type, temperature=1.0)
        for temperature in TEMPERATURES:
            other = distillation_loss(student, teacher, loss_type=loss_type, temperature=temperature)
            torch.testing.assert_close(other, base, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# cross_entropy_per_position
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_cross_entropy_per_position(dtype):
    logits = random_logits((2, 5, 9), seed=18, dtype=dtype)
    targets = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(19))
    targets[0, 1] = -100
    targets[1, 4] = -100
    values = cross_entropy_per_position(logits, targets)
    assert values.shape == (2, 5) and values.dtype == torch.float32
    expected = np_cross_entropy(as_np(logits), targets.numpy())
    np.testing.assert_allclose(as_np(values), expected, rtol=1e-5, atol=1e-5)
    assert values[0, 1].item() == 0.0 and values[1, 4].item() == 0.0
    # Same as torch's own cross entropy on the counted positions.
    torch_ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, 9), targets.reshape(-1), reduction="none", ignore_index=-100
    )
    torch.testing.assert_close(values.reshape(-1), torch_ce, rtol=1e-5, atol=1e-5)


def test_cross_entropy_custom_ignore_index_and_gradient():
    logits = random_logits((6, 5), seed=20, dtype=torch.float64).requires_grad_(True)
    targets = torch.tensor([0, 4, 3, 3, 1, 2])
    values = cross_entropy_per_position(logits, targets, ignore_index=3)
    expected = np_cross_entropy(as_np(logits), targets.numpy(), ignore_index=3)
    np.testing.assert_allclose(as_np(values), expected, rtol=1e-6, atol=1e-6)
    values.sum().backward()
    # d/dz of (logsumexp z − z_y) = softmax(z) − onehot(y), zero on ignored rows.
    z = as_np(logits)
    soft = np.exp(np_log_softmax(z))
    onehot = np.eye(5)[np.where(targets.numpy() == 3, 0, targets.numpy())]
    analytic = np.where((targets.numpy() != 3)[:, None], soft - onehot, 0.0)
    np.testing.assert_allclose(as_np(logits.grad), analytic, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_forward_kl_gradient_analytic(temperature):
    """L = (T²/N)·Σ_n KL(p_n‖q_n), q = softmax(s/T): ∂L/∂s_n = T²·(q_n − p_n)/T / N = T·(q_n − p_n)/N."""
    student = random_logits((3, 4, 8), seed=21, dtype=torch.float64).requires_grad_(True)
    teacher = random_logits((3, 4, 8), seed=22, dtype=torch.float64)
    labels = torch.randint(0, 8, (3, 4), generator=torch.Generator().manual_seed(23))
    labels[0, :2] = -100
    labels[2, 3] = -100
    loss = distillation_loss(student, teacher, labels, loss_type="forward_kl", temperature=temperature)
    loss.backward()
    assert student.grad.dtype == torch.float64
    keep = (labels != -100).numpy()
    p = np.exp(np_log_softmax(as_np(teacher) / temperature))
    q = np.exp(np_log_softmax(as_np(student) / temperature))
    analytic = temperature * (q - p) / keep.sum() * keep[..., None]
    np.testing.assert_allclose(as_np(student.grad), analytic, rtol=1e-4, atol=1e-7)
    assert np.all(as_np(student.grad)[~keep] == 0.0)


@pytest.mark.parametrize("temperature", (0.5, 2.0))
@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_gradient_matches_numerical_reference(loss_type, kwargs, temperature):
    student = random_logits((2, 3, 6), seed=24, scale=1.5, dtype=torch.float64).requires_grad_(True)
    teacher = random_logits((2, 3, 6), seed=25, scale=1.5, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2], [0, 4, -100]])
    loss = distillation_loss(student, teacher, labels, loss_type=loss_type, temperature=temperature, **kwargs)
    grad = backward_grad(loss, student)
    teacher_np, labels_np = as_np(teacher), labels.numpy()

    def reference(s):
        return np_distillation_loss(s, teacher_np, labels_np, -100, loss_type=loss_type, temperature=temperature, **kwargs)

    numerical = np_numerical_grad(reference, as_np(student))
    scale = max(1.0, np.abs(numerical).max())
    np.testing.assert_allclose(as_np(grad), numerical, rtol=1e-4, atol=2e-6 * scale)


def test_gradient_is_not_taken_wrt_teacher_but_flows_if_asked():
    # The teacher normally carries no gradient; if it does require grad, the function still works.
    student = random_logits((4, 6), seed=26).requires_grad_(True)
    teacher = random_logits((4, 6), seed=27).requires_grad_(True)
    loss = distillation_loss(student, teacher, loss_type="jsd", beta=0.3)
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


# --------------------------------------------------------------------------------------------------
# bf16 inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_bf16_inputs(loss_type, kwargs, temperature=2.0):
    student = random_logits((2, 5, 32), seed=28, dtype=torch.bfloat16).requires_grad_(True)
    teacher = random_logits((2, 5, 32), seed=29, dtype=torch.bfloat16)
    labels = torch.zeros((2, 5), dtype=torch.long)
    labels[1, 2] = -100
    loss = distillation_loss(student, teacher, labels, loss_type=loss_type, temperature=temperature, **kwargs)
    assert loss.dtype == torch.float32
    # Reference on the bf16-rounded values (exactly representable in float64).
    expected = np_distillation_loss(
        as_np(student), as_np(teacher), labels.numpy(), loss_type=loss_type, temperature=temperature, **kwargs
    )
    assert_close_scalar(loss, expected, rtol=1e-4, atol=1e-5)
    assert loss.item() >= 0.0
    grad = backward_grad(loss, student)
    assert grad.dtype == torch.bfloat16
    assert torch.isfinite(grad.float()).all()


# --------------------------------------------------------------------------------------------------
# Numerical stability
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_huge_logits_stay_finite(loss_type, kwargs):
    gen = torch.Generator().manual_seed(30)
    signs = torch.where(torch.rand((4, 16), generator=gen) < 0.5, -1.0, 1.0)
    teacher = torch.flip(signs, dims=[-1]) * 1e4 + torch.randn((4, 16), generator=gen)
    for temperature in (0.5, 1.0, 4.0):
        student = (signs * 1e4 + torch.randn((4, 16), generator=gen)).requires_grad_(True)
        loss = distillation_loss(student, teacher, loss_type=loss_type, temperature=temperature, **kwargs)
        assert torch.isfinite(loss) and loss.item() >= 0
        expected = np_distillation_loss(
            as_np(student), as_np(teacher), loss_type=loss_type, temperature=temperature, **kwargs
        )
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert torch.isfinite(backward_grad(loss, student)).all()


# (loss_type, kwargs) whose value stays finite when the teacher gives probability 0 to some tokens:
# every term is Σ a·log(a/b) with b > 0 wherever a > 0.
FINITE_WITH_MASKED_TEACHER = [
    ("forward_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skew_kl", {"skew": 0.0}),
    ("skew_kl", {"skew": 0.1}),
    ("skew_kl", {"skew": 1.0}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.9}),
    ("skew_reverse_kl", {"skew": 1.0}),
    ("tvd", {}),
]


@pytest.mark.parametrize(("loss_type", "kwargs"), FINITE_WITH_MASKED_TEACHER, ids=str)
def test_teacher_with_minus_inf_entries(loss_type, kwargs):
    teacher = random_logits((3, 4, 10), seed=32)
    teacher[..., 7:] = float("-inf")  # e.g. padded / masked vocabulary rows
    teacher[1, 2, 0] = float("-inf")
    labels = torch.ones((3, 4), dtype=torch.long)
    labels[2, 1] = -100
    for temperature in (0.5, 2.0):
        student = random_logits((3, 4, 10), seed=31).requires_grad_(True)
        loss = distillation_loss(student, teacher, labels, loss_type=loss_type, temperature=temperature, **kwargs)
        assert torch.isfinite(loss) and loss.item() >= 0
        expected = np_distillation_loss(
            as_np(student), as_np(teacher), labels.numpy(), loss_type=loss_type, temperature=temperature, **kwargs
        )
        assert math.isfinite(expected)
        assert_close_scalar(loss, expected)
        assert torch.isfinite(backward_grad(loss, student)).all()


@pytest.mark.parametrize(
    ("loss_type", "kwargs"), [("reverse_kl", {}), ("jsd", {"beta": 1.0}), ("skew_reverse_kl", {"skew": 0.0})], ids=str
)
def test_teacher_zero_probability_makes_reverse_kl_infinite_not_nan(loss_type, kwargs):
    # KL(q‖p) is +inf when p = 0 where q > 0: the mathematically right answer, and never NaN.
    student = random_logits((2, 6), seed=33)
    teacher = random_logits((2, 6), seed=34)
    teacher[:, -1] = float("-inf")
    loss = distillation_loss(student, teacher, loss_type=loss_type, **kwargs)
    assert torch.isposinf(loss)


@pytest.mark.parametrize("temperature", (0.5, 4.0))
@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_identical_student_and_teacher_give_exactly_nonnegative_near_zero(loss_type, kwargs, temperature):
    logits = random_logits((16, 4, 32), seed=35, scale=5.0)
    values = token_divergence(logits, logits.clone(), loss_type=loss_type, temperature=temperature, **kwargs)
    assert (values >= 0).all(), values.min().item()
    assert values.max().item() < 1e-5
    loss = distillation_loss(logits, logits.clone(), loss_type=loss_type, temperature=temperature, **kwargs)
    assert loss.item() >= 0.0 and loss.item() < 1e-5


@pytest.mark.parametrize("loss_type", [lt for lt in LOSS_TYPES if lt != "cosine"])
def test_identical_inputs_are_zero_for_exact_losses(loss_type):
    logits = random_logits((8, 20), seed=36)
    loss = distillation_loss(logits, logits.clone(), loss_type=loss_type, skew=0.0, beta=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    if loss_type in ("mse", "tvd"):
        assert loss.item() == 0.0


def test_identical_inputs_cosine_near_zero():
    logits = random_logits((16, 4, 32), seed=35, scale=5.0)
    loss = distillation_loss(logits, logits.clone(), loss_type="cosine")
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize(("loss_type", "kwargs"), LOSS_CASES, ids=LOSS_CASE_IDS)
def test_divergences_are_nonnegative_on_random_inputs(loss_type, kwargs):
    for seed in range(3):
        student = random_logits((8, 3, 12), seed=100 + seed, scale=0.5 + seed)
        # Some teachers are close to the student (small divergences, where rounding matters most).
        noise = random_logits((8, 3, 12), seed=200 + seed, scale=10.0 ** -(seed + 1))
        for teacher in (random_logits((8, 3, 12), seed=300 + seed, scale=2.0), student + noise):
            values = token_divergence(student, teacher, loss_type=loss_type, temperature=1.0 + seed / 2, **kwargs)
            assert torch.isfinite(values).all()
            assert (values >= 0).all(), values.min().item()
            if loss_type == "cosine":
                assert (values <= 2 + 1e-6).all()
            if loss_type == "tvd":
                assert (values <= 1 + 1e-6).all()


# --------------------------------------------------------------------------------------------------
# Errors and the all-ignored case
# --------------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
    student = torch.zeros(2, 3, 5)
    teacher = torch.zeros(2, 3, 6)
    with pytest.raises(ValueError) as info:
        distillation_loss(student, teacher, loss_type="forward_kl")
    message = str(info.value)
    assert "(2, 3, 5)" in message and "(2, 3, 6)" in message


@pytest.mark.parametrize("labels_shape", [(2, 4), (2, 3, 5), (6,), (3, 2)])
def test_labels_shape_mismatch(labels_shape):
    student = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student, student.clone(), torch.zeros(labels_shape, dtype=torch.long), loss_type="forward_kl")


@pytest.mark.parametrize("loss_type", ["kl", "FORWARD_KL", "", "js"])
def test_unknown_loss_type(loss_type):
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="loss_type"):
        distillation_loss(x, x, loss_type=loss_type)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, -1e-9, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(x, x, loss_type="forward_kl", temperature=temperature)


@pytest.mark.parametrize("value", [-0.1, 1.1, -1e-9, 2.0, float("nan")])
@pytest.mark.parametrize("name", ["beta", "skew"])
def test_mixture_weight_out_of_range(name, value):
    x = torch.zeros(2, 4)
    loss_type = "jsd" if name == "beta" else "skew_kl"
    with pytest.raises(ValueError, match=name):
        distillation_loss(x, x, loss_type=loss_type, **{name: value})


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_labels_ignored_warns_and_returns_differentiable_zero(loss_type):
    student = random_logits((2, 3, 7), seed=37).requires_grad_(True)
    teacher = random_logits((2, 3, 7), seed=38)
    labels = torch.full((2, 3), -100)
    with pytest.warns(UserWarning, match="ignore_index"):
        loss = distillation_loss(student, teacher, labels, loss_type=loss_type)
    assert loss.dim() == 0 and loss.item() == 0.0
    assert loss.grad_fn is not None and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_all_labels_ignored_custom_index_without_grad():
    student = random_logits((4, 7), seed=39)
    labels = torch.full((4,), 5)
    with pytest.warns(UserWarning):
        loss = distillation_loss(student, student + 1, labels, loss_type="forward_kl", ignore_index=5)
    assert loss.item() == 0.0 and not loss.requires_grad


def test_degenerate_skew_kl_keeps_a_grad_fn():
    student = random_logits((3, 5), seed=40).requires_grad_(True)
    teacher = random_logits((3, 5), seed=41)
    loss = distillation_loss(student, teacher, loss_type="skew_kl", skew=1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
