"""Offline teacher cache: the bucketed divergence, storage, fingerprints, resuming, and training from it."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hf_distill import LOSS_TYPES, distillation_loss
from hf_distill.cache import CacheSettings, build_cache, bytes_per_token, default_top_k, load_cache
from hf_distill.loss import CachedTeacher, token_divergence, top_k_entries

from conftest import config, prompt_response_dataset

from hf_distill import DistillationTrainer


def cached_token_divergence(student, ids, logprobs, lse, tail="bucket", **options):
    return token_divergence(student, CachedTeacher(ids, logprobs, lse), cache_tail=tail, **options)


def numpy_bucketed_forward_kl(student, teacher, k, temperature):
    """KL over the teacher's top-k tokens plus one 'rest' bucket, in float64 loops."""
    values = []
    for s_row, t_row in zip(student.astype(np.float64), teacher.astype(np.float64)):
        p = np.exp(t_row / temperature - np.logaddexp.reduce(t_row / temperature))
        q = np.exp(s_row / temperature - np.logaddexp.reduce(s_row / temperature))
        top = np.argsort(-p)[:k]
        rest = np.setdiff1d(np.arange(len(p)), top)
        p_b = np.append(p[top], p[rest].sum())
        q_b = np.append(q[top], q[rest].sum())
        values.append(temperature**2 * sum(a * math.log(a / b) for a, b in zip(p_b, q_b) if a > 0))
    return np.array(values)


def test_bucketed_kl_matches_numpy_and_bounds_the_full_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50) * 2, torch.randn(6, 50) * 3
    for k in (1, 5, 20):
        ids, logprobs, lse = top_k_entries(teacher, k, temperature=2.0)
        cached = cached_token_divergence(student, ids, logprobs, lse, loss_type="forward_kl", temperature=2.0)
        expected = numpy_bucketed_forward_kl(student.numpy(), teacher.numpy(), k, 2.0)
        np.testing.assert_allclose(cached.numpy(), expected, rtol=1e-4, atol=1e-6)
        full = distillation_loss(student, teacher, loss_type="forward_kl", temperature=2.0)
        assert cached.mean() <= full + 1e-6  # merging tokens never increases a divergence


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_top_k_equals_online(loss_type):
    """With k = V nothing is left in the tail, so every loss equals the online one."""
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 40), torch.randn(5, 40) * 2
    ids, logprobs, lse = top_k_entries(teacher, 40, temperature=1.5)
    cached = cached_token_divergence(
        student, ids, logprobs, lse, loss_type=loss_type, temperature=1.5, beta=0.3, skew=0.2
    )
    online = distillation_loss(student, teacher, loss_type=loss_type, temperature=1.5, beta=0.3, skew=0.2)
    assert cached.mean().item() == pytest.approx(online.item(), rel=1e-4, abs=1e-6)


def test_renormalized_tail_is_kl_of_renormalized_top_k():
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 30), torch.randn(4, 30) * 2
    ids, logprobs, lse = top_k_entries(teacher, 6, temperature=1.0)
    value = cached_token_divergence(student, ids, logprobs, lse, loss_type="forward_kl", temperature=1.0, tail="renormalize")
    for row in range(4):
        top = ids[row].numpy()
        p = np.exp(teacher[row].double().numpy()[top]); p /= p.sum()
        q = np.exp(student[row].double().numpy()[top]); q /= q.sum()
        assert value[row].item() == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-4)


def test_default_top_k_fits_256_bytes():
    assert default_top_k(49152) == 63 and bytes_per_token(49152, 63) <= 256
    assert default_top_k(151936) == 42 and bytes_per_token(151936, 42) <= 256


@pytest.fixture
def cache_setup(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=12)
    return teacher, student, dataset, tokenizer


def test_cache_storage_and_bytes_per_token(tmp_path, cache_setup):
    teacher, _, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache", shard_rows=5)
    cache, info = load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))
    targets = sum(sum(1 for label in labels[1:] if label != -100) for labels in dataset["labels"])
    k = info["settings"]["top_k"]
    assert len(cache) == len(dataset)
    assert sum(len(row) for row in cache["teacher_lse"]) == targets
    assert all(len(ids) == k * len(lse) for ids, lse in zip(cache["teacher_ids"], cache["teacher_lse"]))
    stored = sum(os.path.getsize(path / name) for name in os.listdir(path) if name.endswith(".arrow"))
    assert stored / targets <= 256 + 64  # per-row list offsets are the only overhead beyond the 4k+4 bytes
    # The stored entries are the teacher's top-k log-probabilities.
    row0 = dataset[0]
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([row0["input_ids"]])).logits[0, :-1]
    first = [i for i, label in enumerate(row0["labels"][1:]) if label != -100][0]
    expected = torch.log_softmax(logits[first], -1).topk(k)
    assert cache[0]["teacher_ids"][:k] == expected.indices.tolist()
    np.testing.assert_allclose(cache[0]["teacher_logprobs"][:k], expected.values.numpy(), atol=2e-2, rtol=2e-3)


def test_cache_refuses_other_data_tokenizer_and_settings(tmp_path, cache_setup):
    teacher, _, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache")
    with pytest.raises(ValueError, match="different dataset"):
        load_cache(path, dataset.select(range(5)), tokenizer, CacheSettings(1.0, 0, False))
    with pytest.raises(ValueError, match="different settings"):
        load_cache(path, dataset, tokenizer, CacheSettings(2.0, 0, False))
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)
    with pytest.raises(ValueError, match="different teacher"):
        build_cache(other, dataset, tokenizer, path)  # never mixes into an existing cache
    with pytest.raises(ValueError, match="holds no teacher cache"):
        load_cache(tmp_path / "nowhere", dataset, tokenizer, CacheSettings(1.0, 0, False))


def test_cache_resumes_missing_shards(tmp_path, cache_setup):
    teacher, _, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache", shard_rows=4)
    first, _ = load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))
    reference = first.to_dict()
    kept = path / "shard-00000.arrow"
    stamp = kept.stat().st_mtime_ns
    os.remove(path / "shard-00001.arrow")
    with pytest.raises(ValueError, match="incomplete"):
        load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))
    build_cache(teacher, dataset, tokenizer, path, shard_rows=4)
    assert kept.stat().st_mtime_ns == stamp  # finished shards are not redone
    again, _ = load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))
    assert again.to_dict() == reference


@pytest.mark.parametrize("distill_all_tokens", [False, True])
def test_training_from_full_cache_equals_online(tmp_path, cache_setup, distill_all_tokens):
    """With k = V the cached run takes the same steps as the online one (up to float16 storage)."""
    teacher, student, dataset, tokenizer = cache_setup
    vocab = teacher.config.vocab_size
    path = build_cache(
        teacher, dataset, tokenizer, tmp_path / "cache", top_k=vocab, temperature=2.0, distill_all_tokens=distill_all_tokens
    )
    results = []
    for cached in (False, True):
        model = copy.deepcopy(student)
        args = config(
            tmp_path, max_steps=3, per_device_train_batch_size=4, optim="sgd", learning_rate=0.5, alpha=0.7,
            temperature=2.0, lr_scheduler_type="constant", max_grad_norm=0.0, distill_all_tokens=distill_all_tokens,
            teacher_cache=str(path) if cached else None,
        )
        trainer = DistillationTrainer(
            model=model, teacher_model=None if cached else teacher, args=args, train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), trainer.state.log_history))
    (online, online_logs), (cached, cached_logs) = results
    for a, b in zip(online_logs[:3], cached_logs[:3]):
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=2e-3)
    torch.testing.assert_close(cached, online, rtol=1e-3, atol=1e-4)


def test_cache_with_other_labels_is_refused_in_training(tmp_path, cache_setup):
    teacher, student, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache")
    with pytest.raises(ValueError, match="different settings"):
        DistillationTrainer(
            model=student, args=config(tmp_path, teacher_cache=str(path), distill_all_tokens=True),
            train_dataset=dataset, processing_class=tokenizer,
        )


def test_cache_tail_setting_reaches_the_loss(tmp_path, cache_setup):
    """teacher_cache_tail='renormalize' trains on the renormalized top-k, not on the (k + 1)-bucket loss."""
    teacher, student, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache", top_k=4)
    first_kd = {}
    for tail in ("bucket", "renormalize"):
        args = config(tmp_path / tail, max_steps=1, per_device_train_batch_size=4, teacher_cache=str(path), teacher_cache_tail=tail)
        trainer = DistillationTrainer(model=copy.deepcopy(student), args=args, train_dataset=dataset, processing_class=tokenizer)
        assert trainer.loss_fn.settings.cache_tail == tail
        trainer.train()
        first_kd[tail] = trainer.state.log_history[0]["kd_loss"]
    assert first_kd["bucket"] != pytest.approx(first_kd["renormalize"], rel=1e-3)


# ---- interrupted and damaged builds ---------------------------------------------------------------

# Builds the cache of `cache_setup` in a subprocess, slowly (0.3 s a teacher batch), so the test can kill it.
SLOW_BUILD = """
import sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
work, cache, threads, tests = sys.argv[1:]
sys.path.insert(0, tests)
from conftest import prompt_response_dataset
from hf_distill.cache import build_cache
torch.set_num_threads(int(threads))
teacher = AutoModelForCausalLM.from_pretrained(work + "/teacher")
tokenizer = AutoTokenizer.from_pretrained(work + "/tokenizer")
teacher.register_forward_hook(lambda *args: time.sleep(0.3))
build_cache(teacher, prompt_response_dataset(tokenizer, n=12), tokenizer, cache, shard_rows=2, batch_size=2,
            teacher_name="teacher")
"""


def cache_files(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_killed_cache_build_resumes_to_the_uninterrupted_result(tmp_path, cache_setup):
    """kill -9 in the middle of a build, then run it again: the cache equals one built without a stop, byte for byte."""
    teacher, _, dataset, tokenizer = cache_setup
    teacher.save_pretrained(tmp_path / "work" / "teacher")
    tokenizer.save_pretrained(tmp_path / "work" / "tokenizer")
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILD, str(tmp_path / "work"), str(killed), str(torch.get_num_threads()),
         os.path.dirname(__file__)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"),
    )
    options = dict(shard_rows=2, batch_size=2, teacher_name="teacher")
    reference = build_cache(teacher, dataset, tokenizer, tmp_path / "reference", **options)  # meanwhile

    def recorded():
        try:
            return json.loads((killed / "cache_info.json").read_text())["shards"]
        except (OSError, ValueError, KeyError):
            return {}

    deadline = time.time() + 60
    while len(recorded()) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    done = recorded()
    assert 2 <= len(done) < 6  # killed mid-build: some shards finished, some not
    kept = {name: (killed / name).stat().st_mtime_ns for name in done}
    with pytest.raises(ValueError, match="incomplete"):
        load_cache(killed, dataset, tokenizer, CacheSettings(1.0, 0, False))

    build_cache(teacher, dataset, tokenizer, killed, **options)
    assert {name: (killed / name).stat().st_mtime_ns for name in done} == kept  # finished shards are not redone
    assert cache_files(killed) == cache_files(reference)
    cached, _ = load_cache(killed, dataset, tokenizer, CacheSettings(1.0, 0, False))
    assert cached.to_dict() == load_cache(reference, dataset, tokenizer, CacheSettings(1.0, 0, False))[0].to_dict()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "unrecorded"])
def test_damaged_shard_is_refused_then_rebuilt(tmp_path, cache_setup, damage):
    teacher, _, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache", shard_rows=5)
    reference = cache_files(path)
    shard = path / "shard-00001.arrow"
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        shard.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:  # killed between the rename and the record: the shard is there, its record is not
        info = json.loads((path / "cache_info.json").read_text())
        del info["shards"][shard.name]
        (path / "cache_info.json").write_text(json.dumps(info))
    message = "incomplete" if damage == "unrecorded" else r"damaged shards \['shard-00001.arrow'\]"
    with pytest.raises(ValueError, match=message):
        load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))
    build_cache(teacher, dataset, tokenizer, path, shard_rows=5)
    assert cache_files(path) == reference
    load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))


def test_cache_refuses_other_shard_rows_and_a_cut_info_file(tmp_path, cache_setup):
    teacher, _, dataset, tokenizer = cache_setup
    path = build_cache(teacher, dataset, tokenizer, tmp_path / "cache", shard_rows=5)
    with pytest.raises(ValueError, match="started with shard_rows=5, now 4"):
        build_cache(teacher, dataset, tokenizer, path, shard_rows=4)
    info = (path / "cache_info.json").read_text()
    (path / "cache_info.json").write_text(info[: len(info) // 2])
    with pytest.raises(ValueError, match="cache_info.json is unreadable"):
        load_cache(path, dataset, tokenizer, CacheSettings(1.0, 0, False))
