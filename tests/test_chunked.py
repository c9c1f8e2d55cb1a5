"""Tests of `hf_distill.chunked`: the chunked blended loss equals the unchunked one, values and gradients.

`chunked_blended_loss(hidden, weight, bias, ...)` must give the same (loss, Σ divergence, Σ CE) and the
same gradients wrt hidden, weight and bias as `blended_loss(F.linear(hidden, weight, bias), ...)`.

Note on precision: the losses are computed in float32 whatever the input dtype (documented in
`hf_distill.losses`), so even float64 inputs only agree to float32 rounding; the exactness tests use
float32 (and float64 inputs, to check the dtype handling) with rtol 1e-5.
"""

from __future__ import annotations

import contextlib
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_distill import LOSS_TYPES
from hf_distill.loss import (
    CachedTeacher,
    LossSettings,
    PositionTargets,
    TeacherHidden,
    TeacherLogits,
    blended_loss,
    chunked_blended_loss,
    default_chunk_size,
    top_k_entries,
)

N, D, D_TEACHER, V = 11, 6, 5, 13
CHUNK_SIZES = (1, 3, 7, 64)  # 64 > N: a single chunk
RTOL, ATOL = 1e-5, 1e-6

# (teacher kind, with student bias, extra teacher vocabulary rows)
TEACHER_CONFIGS = [
    ("linear", True, 0),
    ("linear", False, 5),
    ("logits", False, 3),
    ("logits", True, 0),
]
TEACHER_CONFIG_IDS = [f"{kind}-{'bias' if bias else 'nobias'}-extra{extra}" for kind, bias, extra in TEACHER_CONFIGS]


def settings_for(loss_type: str, temperature: float) -> LossSettings:
    return LossSettings(loss_type=loss_type, temperature=temperature, beta=0.3, skew=0.2)


def make_positions(n: int, vocab: int, seed: int, alpha: float = 0.6) -> PositionTargets:
    """Positions where kd_mask != ce_mask: some KD-only (target -100), some CE-only, some neither."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    kd_mask = torch.rand(n, generator=gen) < 0.7
    ce_mask = torch.rand(n, generator=gen) < 0.6
    if n >= 4:
        kd_mask[:4] = torch.tensor([True, False, True, False])
        ce_mask[:4] = torch.tensor([False, True, True, False])
    targets[~ce_mask] = -100  # KD-only positions carry no target
    kd_scale = alpha / max(1, int(kd_mask.sum()))
    ce_scale = (1 - alpha) / max(1, int(ce_mask.sum()))
    return PositionTargets(targets, kd_mask, ce_mask, kd_scale, ce_scale)


def make_case(*, n=N, bias=True, teacher_kind="linear", extra_vocab=0, dtype=torch.float32, seed=0):
    """Student (hidden, weight, bias) and a teacher (hidden, head), all of `dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    hidden = randn(n, D)
    weight = randn(V, D, scale=0.7)
    head_bias = randn(V, scale=0.5) if bias else None
    teacher_vocab = V + extra_vocab
    if teacher_kind is None:
        teacher_hidden, teacher_head = None, None
    elif teacher_kind == "linear":
        teacher_hidden = randn(n, D_TEACHER)
        teacher_head = nn.Linear(D_TEACHER, teacher_vocab, dtype=dtype)
        with torch.no_grad():
            teacher_head.weight.copy_(randn(teacher_vocab, D_TEACHER, scale=0.8))
            teacher_head.bias.copy_(randn(teacher_vocab, scale=0.5))
        teacher_head.requires_grad_(False)
    elif teacher_kind == "logits":
        teacher_hidden = randn(n, teacher_vocab, scale=2.0)  # precomputed teacher logits
        teacher_head = nn.Identity()
    else:
        raise AssertionError(teacher_kind)
    return hidden, weight, head_bias, teacher_hidden, teacher_head


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def as_teacher(teacher_hidden, teacher_head):
    """The chunked loss's typed teacher for a (hidden, head) pair of these tests."""
    if teacher_hidden is None or isinstance(teacher_hidden, CachedTeacher):
        return teacher_hidden
    if isinstance(teacher_head, nn.Identity):
        return TeacherLogits(teacher_hidden)
    return TeacherHidden(teacher_hidden, teacher_head)


def forward_context(bf16_autocast: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext()


def run_reference(
    hidden, weight, bias, teacher_hidden, teacher_head, positions, settings, upstream=1.0, bf16_autocast=False
):
    """blended_loss of the full logits; the forward pass (only) runs under autocast when asked."""
    h, w, b = leaves(hidden, weight, bias)
    with forward_context(bf16_autocast):
        teacher_logits = None
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_hidden)
        loss, kd, ce = blended_loss(F.linear(h, w, b), teacher_logits, positions, settings)
    if loss.requires_grad:
        (loss * upstream).backward()
    return (loss, kd, ce), (h.grad, w.grad, None if b is None else b.grad)


def run_chunked(
    hidden, weight, bias, teacher_hidden, teacher_head, positions, settings, chunk_size, upstream=1.0,
    bf16_autocast=False,
):
    h, w, b = leaves(hidden, weight, bias)
    with forward_context(bf16_autocast):
        loss, kd, ce = chunked_blended_loss(h, w, b, as_teacher(teacher_hidden, teacher_head), positions, settings, chunk_size)
    (loss * upstream).backward()
    return (loss, kd, ce), (h.grad, w.grad, None if b is None else b.grad)


def assert_same(reference, chunked, rtol=RTOL, atol=ATOL):
    (ref_values, ref_grads), (chk_values, chk_grads) = reference, chunked
    for name, ref, chk in zip(("loss", "kd_sum", "ce_sum"), ref_values, chk_values):
        assert chk.shape == () and chk.dtype == torch.float32, name
        torch.testing.assert_close(chk, ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for name, ref, chk in zip(("hidden", "weight", "bias"), ref_grads, chk_grads):
        if ref is None:
            assert chk is None, name
            continue
        assert chk is not None and chk.dtype == ref.dtype and chk.shape == ref.shape, name
        torch.testing.assert_close(chk, ref, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


# --------------------------------------------------------------------------------------------------
# Chunked == unchunked
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("teacher_kind", "bias", "extra_vocab"), TEACHER_CONFIGS, ids=TEACHER_CONFIG_IDS)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunked_equals_unchunked(loss_type, temperature, teacher_kind, bias, extra_vocab):
    case = make_case(bias=bias, teacher_kind=teacher_kind, extra_vocab=extra_vocab, seed=1)
    positions = make_positions(N, V, seed=2)
    settings = settings_for(loss_type, temperature)
    reference = run_reference(*case, positions, settings)
    assert reference[0][1].item() > 0 and reference[0][2].item() > 0  # both terms really present
    for chunk_size in CHUNK_SIZES:
        assert_same(reference, run_chunked(*case, positions, settings, chunk_size))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunked_equals_unchunked_float64_inputs(loss_type):
    case = make_case(bias=True, teacher_kind="linear", extra_vocab=2, dtype=torch.float64, seed=3)
    positions = make_positions(N, V, seed=4)
    settings = settings_for(loss_type, 2.0)
    reference = run_reference(*case, positions, settings)
    for chunk_size in (1, 4, 64):
        chunked = run_chunked(*case, positions, settings, chunk_size)
        assert all(g.dtype == torch.float64 for g in chunked[1])
        assert_same(reference, chunked)


@pytest.mark.parametrize("beta", (0.0, 1.0))
def test_jsd_endpoints_chunked_equal_unchunked(beta):
    case = make_case(seed=21)
    positions = make_positions(N, V, seed=22)
    settings = LossSettings(loss_type="jsd", temperature=1.5, beta=beta)
    reference = run_reference(*case, positions, settings)
    for chunk_size in (2, 64):
        assert_same(reference, run_chunked(*case, positions, settings, chunk_size))


@pytest.mark.parametrize("tail", ("bucket", "renormalize"))
@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunked_cached_teacher_equals_unchunked(loss_type, temperature, tail):
    """A cached top-k teacher (k < V): the chunked loss equals autograd through the unchunked one."""
    hidden, weight, bias, teacher_hidden, teacher_head = make_case(seed=23)
    with torch.no_grad():
        ids, logprobs, lse = top_k_entries(teacher_head(teacher_hidden), 4, temperature)
    cached = CachedTeacher(ids, logprobs.half().float(), lse)
    positions = make_positions(N, V, seed=24)
    settings = LossSettings(loss_type=loss_type, temperature=temperature, beta=0.3, skew=0.2, cache_tail=tail)
    reference = run_reference(hidden, weight, bias, cached, nn.Identity(), positions, settings)
    assert reference[0][1].item() > 0
    for chunk_size in (1, 4, 64):
        assert_same(reference, run_chunked(hidden, weight, bias, cached, nn.Identity(), positions, settings, chunk_size))


@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("loss_type", ("forward_kl", "reverse_kl", "jsd"))
def test_cached_teacher_with_vanishing_student_tail(loss_type, temperature):
    """Rows where the student leaves ~1e-50, ~1e-32 or ~1e-17 of its mass outside the teacher's top-k: float32 tail
    probabilities underflow there, and the chunk falls back to log space for those rows only."""
    gen = torch.Generator().manual_seed(29)
    n, vocab, k = 12, 40, 5
    teacher_logits = 3 * torch.randn(n, vocab, generator=gen)
    cached = CachedTeacher(*top_k_entries(teacher_logits, k, temperature))
    logits = torch.randn(n, vocab, generator=gen)
    boost = torch.tensor([120.0, 75.0, 40.0, 0.0] * 3)[:, None] * temperature  # e^-120 underflows, e^-75 < 1e-30 < e^-40
    logits.scatter_add_(-1, cached.ids, boost.expand(n, k).contiguous())
    weight = torch.eye(vocab)  # the "head" returns the hidden states: they are the logits
    positions = make_positions(n, vocab, seed=30)
    settings = LossSettings(loss_type=loss_type, temperature=temperature)
    reference = run_reference(logits, weight, None, cached, nn.Identity(), positions, settings)
    assert torch.isfinite(reference[1][0]).all()
    for chunk_size in (1, 5, 64):
        chunked = run_chunked(logits, weight, None, cached, nn.Identity(), positions, settings, chunk_size)
        assert_same(reference, chunked, rtol=1e-4, atol=2e-5)  # logits up to 240: float32 rounding ~1e-6 of them


@pytest.mark.parametrize("teacher_kind", ("linear", "cached", None))
def test_closed_form_and_autograd_chunks_agree_at_scale(teacher_kind):
    """Closed-form chunk gradients vs autograd chunk gradients on a wider vocabulary with peaked teachers."""
    gen = torch.Generator().manual_seed(25)
    n, d, vocab = 40, 16, 2000
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen)
    teacher_logits = 8 * torch.randn(n, vocab, generator=gen)  # peaked: many p underflow to 0 in float32
    teacher = teacher_logits
    if teacher_kind == "cached":
        teacher = CachedTeacher(*top_k_entries(teacher_logits, 63, 1.0))
    elif teacher_kind is None:
        teacher = None
    positions = make_positions(n, vocab, seed=26)
    results = []
    for closed_form in (True, False):
        settings = LossSettings(loss_type="forward_kl", closed_form=closed_form)
        head = None if teacher is None else nn.Identity()
        results.append(run_chunked(hidden, weight, None, teacher, head, positions, settings, 16))
    assert_same(results[1], results[0], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_chunks_equal_unchunked():
    """compile_loss: the torch.compile'd chunk math gives the unchunked values and gradients (one compile, ~30 s)."""
    case = make_case(bias=True, teacher_kind="linear", extra_vocab=2, seed=27)
    positions = make_positions(N, V, seed=28)
    settings = LossSettings(loss_type="jsd", temperature=2.0, beta=0.3, compile=True)
    reference = run_reference(*case, positions, settings)
    for chunk_size in (3, 64):  # ragged last chunk, then one chunk: dynamic shapes, no recompile
        assert_same(reference, run_chunked(*case, positions, settings, chunk_size))


@pytest.mark.parametrize("upstream", (0.0, 2.5, -1.0))
def test_upstream_gradient_is_applied(upstream):
    case = make_case(seed=5)
    positions = make_positions(N, V, seed=6)
    settings = settings_for("jsd", 2.0)
    reference = run_reference(*case, positions, settings, upstream=upstream)
    assert_same(reference, run_chunked(*case, positions, settings, 3, upstream=upstream))


def test_frozen_head_gives_no_weight_or_bias_gradient():
    hidden, weight, bias, teacher_hidden, teacher_head = make_case(seed=7)
    positions = make_positions(N, V, seed=8)
    settings = settings_for("forward_kl", 1.0)
    reference = run_reference(hidden, weight, bias, teacher_hidden, teacher_head, positions, settings)
    h = hidden.clone().requires_grad_(True)
    loss, kd, ce = chunked_blended_loss(h, weight, bias, as_teacher(teacher_hidden, teacher_head), positions, settings, 4)
    loss.backward()
    torch.testing.assert_close(loss, reference[0][0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h.grad, reference[1][0], rtol=RTOL, atol=ATOL)
    assert weight.grad is None and bias.grad is None


def test_sums_are_not_differentiable():
    case = make_case(seed=9)
    _, kd, ce = chunked_blended_loss(*leaves(*case[:3]), as_teacher(*case[3:]), make_positions(N, V, seed=10), LossSettings(), 3)
    assert not kd.requires_grad and not ce.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_teacher_padding_rows_are_ignored(loss_type):
    """Teacher vocab > student vocab: only the shared leading rows enter the divergence."""
    hidden, weight, bias, teacher_logits, head = make_case(teacher_kind="logits", extra_vocab=4, seed=11)
    positions = make_positions(N, V, seed=12)
    settings = settings_for(loss_type, 2.0)
    base = run_reference(hidden, weight, bias, teacher_logits[:, :V], head, positions, settings)
    changed = teacher_logits.clone()
    changed[:, V:] = torch.linspace(-50, 50, N * 4).reshape(N, 4)  # arbitrary padding rows
    for teacher in (teacher_logits, changed):
        assert_same(base, run_reference(hidden, weight, bias, teacher, head, positions, settings))
        assert_same(base, run_chunked(hidden, weight, bias, teacher, head, positions, settings, 5))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("bias", (True, False))
def test_teacher_none_is_ce_only(chunk_size, bias):
    hidden, weight, head_bias, _, _ = make_case(bias=bias, teacher_kind=None, seed=13)
    positions = make_positions(N, V, seed=14)
    settings = settings_for("forward_kl", 2.0)
    reference = run_reference(hidden, weight, head_bias, None, None, positions, settings)
    chunked = run_chunked(hidden, weight, head_bias, None, None, positions, settings, chunk_size)
    assert_same(reference, chunked)
    loss, kd, ce = chunked[0]
    assert kd.item() == 0.0
    torch.testing.assert_close(loss, positions.ce_scale * ce, rtol=RTOL, atol=ATOL)
    # Same as torch's cross entropy on the CE positions.
    logits = F.linear(hidden, weight, head_bias)
    expected_ce = F.cross_entropy(logits[positions.ce_mask], positions.targets[positions.ce_mask], reduction="sum")
    torch.testing.assert_close(ce, expected_ce, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("teacher_kind", ("linear", "logits", None))
@pytest.mark.parametrize("bias", (True, False))
def test_zero_positions(teacher_kind, bias):
    hidden, weight, head_bias, teacher_hidden, teacher_head = make_case(n=0, bias=bias, teacher_kind=teacher_kind)
    positions = make_positions(0, V, seed=15)
    assert positions.targets.shape == (0,)
    settings = settings_for("jsd", 2.0)
    for chunk_size in (1, 7):
        h, w, b = leaves(hidden, weight, head_bias)
        loss, kd, ce = chunked_blended_loss(h, w, b, as_teacher(teacher_hidden, teacher_head), positions, settings, chunk_size)
        assert loss.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
        loss.backward()
        assert h.grad.shape == (0, D)
        assert torch.equal(w.grad, torch.zeros_like(weight))
        if bias:
            assert torch.equal(b.grad, torch.zeros_like(head_bias))
    # The unchunked form agrees.
    reference = run_reference(hidden, weight, head_bias, teacher_hidden, teacher_head, positions, settings)
    assert all(v.item() == 0.0 for v in reference[0])


def test_zero_scale_term_is_left_out_even_if_teacher_overflowed():
    hidden, weight, bias, teacher_logits, head = make_case(teacher_kind="logits", seed=16)
    teacher_logits = teacher_logits.clone()
    teacher_logits[2, :] = float("nan")
    teacher_logits[5, 3] = float("inf")
    positions = make_positions(N, V, seed=17, alpha=0.0)
    assert positions.kd_scale == 0 and positions.kd_mask[2] and positions.kd_mask[5]
    settings = settings_for("forward_kl", 1.0)
    ce_only = run_reference(hidden, weight, bias, None, None, positions, settings)
    for chunk_size in (1, 4, 64):
        (loss, kd, ce), grads = run_chunked(hidden, weight, bias, teacher_logits, head, positions, settings, chunk_size)
        torch.testing.assert_close(loss, ce_only[0][0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ce, ce_only[0][2], rtol=RTOL, atol=ATOL)
        for got, want in zip(grads, ce_only[1]):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_chunk_size_must_be_positive():
    case = make_case(seed=18)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_blended_loss(*case[:3], as_teacher(*case[3:]), make_positions(N, V, seed=19), LossSettings(), 0)


def test_default_chunk_size():
    for vocab in (1, 7, 1000, 32_000, 151_936, 1 << 24, 1 << 26):
        size = default_chunk_size(vocab)
        assert size >= 8 and size & (size - 1) == 0  # a power of two, at least 8
        if vocab <= (1 << 24) // 8:
            assert size * vocab <= 1 << 24
    assert default_chunk_size(1000, budget_elements=1 << 20) == 1024


# --------------------------------------------------------------------------------------------------
# blended_loss against an independent NumPy float64 reference
# --------------------------------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_divergence_rows(student, teacher, loss_type, temperature, beta):
    """Per row: T²·KL(p‖q) (forward_kl) or T²·[β·KL(p‖m) + (1−β)·KL(q‖m)], m = β·p + (1−β)·q (jsd)."""
    out = []
    for s_row, t_row in zip(student, teacher):
        p = np.exp(np_log_softmax(t_row / temperature))
        q = np.exp(np_log_softmax(s_row / temperature))
        if loss_type == "forward_kl":
            value = sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0)
        elif loss_type == "jsd":
            m = beta * p + (1 - beta) * q
            value = beta * sum(pv * math.log(pv / mv) for pv, mv in zip(p, m) if pv > 0)
            value += (1 - beta) * sum(qv * math.log(qv / mv) for qv, mv in zip(q, m) if qv > 0)
        else:
            raise AssertionError(loss_type)
        out.append(temperature**2 * value)
    return np.array(out)


def np_cross_entropy_rows(logits, targets):
    out = []
    for row, target in zip(np.asarray(logits, dtype=np.float64), targets):
        out.append(0.0 if target == -100 else -np_log_softmax(row)[target])
    return np.array(out)


@pytest.mark.parametrize(("loss_type", "temperature"), [("forward_kl", 2.0), ("jsd", 1.0)])
def test_blended_loss_matches_numpy_reference(loss_type, temperature):
    _, _, _, teacher_logits, _ = make_case(teacher_kind="logits", extra_vocab=3, seed=20)
    student_logits = make_case(teacher_kind="logits", seed=21)[3]  # (N, V) logits
    positions = make_positions(N, V, seed=22, alpha=0.7)
    settings = settings_for(loss_type, temperature)
    loss, kd, ce = blended_loss(student_logits, teacher_logits, positions, settings)

    s = student_logits.double().numpy()
    t = teacher_logits.double().numpy()[:, :V]  # shared leading rows only
    kd_mask, ce_mask = positions.kd_mask.numpy(), positions.ce_mask.numpy()
    div = np_divergence_rows(s, t, loss_type, temperature, settings.beta)
    ce_rows = np_cross_entropy_rows(s, positions.targets.numpy())
    expected_kd = div[kd_mask].sum()
    expected_ce = ce_rows[ce_mask].sum()
    expected_loss = positions.kd_scale * expected_kd + positions.ce_scale * expected_ce
    assert kd.item() == pytest.approx(expected_kd, rel=1e-5)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert not kd.requires_grad and not ce.requires_grad


# --------------------------------------------------------------------------------------------------
# bf16 under autocast
# --------------------------------------------------------------------------------------------------


def assert_close_bf16(reference, chunked):
    (ref_values, ref_grads), (chk_values, chk_grads) = reference, chunked
    for ref, chk in zip(ref_values, chk_values):
        assert torch.isfinite(chk)
        torch.testing.assert_close(chk.float(), ref.float(), rtol=2e-2, atol=1e-2)
    for ref, chk in zip(ref_grads, chk_grads):
        if ref is None:
            assert chk is None
            continue
        assert chk.dtype == ref.dtype
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(chk.float(), ref.float(), rtol=3e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("param_dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("teacher_kind", ("linear", "logits"))
@pytest.mark.parametrize("loss_type", ("forward_kl", "jsd", "tvd", "mse"))
def test_bf16_autocast(loss_type, teacher_kind, param_dtype):
    case = make_case(bias=True, teacher_kind=teacher_kind, extra_vocab=2, dtype=param_dtype, seed=23)
    positions = make_positions(N, V, seed=24)
    settings = settings_for(loss_type, 2.0)
    reference = run_reference(*case, positions, settings, bf16_autocast=True)
    for chunk_size in (1, 4, 64):
        chunked = run_chunked(*case, positions, settings, chunk_size, bf16_autocast=True)
        for grad in chunked[1]:
            assert grad.dtype == param_dtype  # gradients come back in the input dtypes
            assert torch.isfinite(grad.float()).all()
        assert_close_bf16(reference, chunked)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_teacher_minus_inf_logits_give_finite_closed_form(alpha):
    """Tokens a teacher rules out (logit −inf, p = 0) add nothing to forward KL, in the closed form as in autograd."""
    hidden, weight, bias, _, _ = make_case(seed=30)
    teacher_logits = torch.randn(N, V, generator=torch.Generator().manual_seed(31)) * 2
    teacher_logits[2, :4] = float("-inf")
    teacher_logits[7, 5] = float("-inf")
    positions = make_positions(N, V, seed=32, alpha=alpha)
    settings = settings_for("forward_kl", 1.0)
    reference = run_reference(hidden, weight, bias, teacher_logits, nn.Identity(), positions, settings)
    chunked = run_chunked(hidden, weight, bias, teacher_logits, nn.Identity(), positions, settings, 4)
    assert torch.isfinite(chunked[0][0]) and torch.isfinite(chunked[0][1])
    assert_same(reference, chunked)
