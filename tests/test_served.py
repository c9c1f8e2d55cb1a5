"""A teacher served by a real vLLM server (its CPU build, in its own environment): the top-k it serves, training and
the offline cache from it, and its faults.

The server is started once for the module on a tiny Llama saved from a config. vLLM lives in `.vllm-venv/` (what
`.ci/run` installs) or where HF_DISTILL_VLLM_PYTHON points; without it these tests are skipped.
"""

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import DATA, FAST, REPO, causal_dataset, config, other_student, prompt_response_dataset, sharpen  # noqa: F401
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_distill import DistillationTrainer
from hf_distill.cache import build_cache
from hf_distill.data import default_collator
from hf_distill.modeling import CAUSAL
from hf_distill.runner.cli import main
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer
from hf_distill.served import (
    LocalVLLMServer,
    RolloutServer,
    ServedTeacherCollator,
    ServerError,
    TeacherServer,
    served_weights,
)

VLLM_PYTHON = os.environ.get("HF_DISTILL_VLLM_PYTHON", str(REPO / ".vllm-venv" / "bin" / "python"))
NAME = "tiny-teacher"
TOP_K = 8
MAX_MODEL_LEN = 96


def tiny_teacher(tokenizer):
    # head_dim 64: a size every vLLM CPU attention kernel takes
    return sharpen(small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=0, num_attention_heads=2,
                               num_key_value_heads=2), 5.0).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """(the running server's URL, the same teacher in this process, its folder)."""
    if not os.path.exists(VLLM_PYTHON):
        pytest.skip(f"vLLM is not installed at {VLLM_PYTHON} (.ci/run installs it; see docs/served_teacher.md)")
    root = tmp_path_factory.mktemp("served")
    teacher = tiny_teacher(tokenizer)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    # Dev mode: the same server also stands in for a student's rollout server (it takes new weights).
    server = LocalVLLMServer(VLLM_PYTHON, str(root / "teacher"), name=NAME, max_model_len=MAX_MODEL_LEN,
                             log_file=str(root / "vllm.log"), env={"VLLM_SERVER_DEV_MODE": "1"})
    try:
        server.start()
    except ServerError as error:
        log = (root / "vllm.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"{error}\n{log}")
    yield server.url, teacher, root / "teacher"
    server.stop()


@pytest.fixture(scope="module")
def lora_served(served, tmp_path_factory):
    """A second server on the same teacher that takes LoRA adapters at run time, as a LoRA student's rollout server.
    (Not the teacher's: vLLM 0.32's CPU build fails prompt log-probs of several rows at once with --enable-lora.)"""
    _, _, folder = served
    log = tmp_path_factory.mktemp("lora") / "vllm.log"
    # Kept on one core (the last): the `cpus` option a trainer uses to keep a server off its own cores.
    core = max(os.sched_getaffinity(0))
    server = LocalVLLMServer(VLLM_PYTHON, str(folder), name=NAME, max_model_len=MAX_MODEL_LEN, log_file=str(log),
                             extra_args=("--enable-lora", "--max-lora-rank", "8"),
                             env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, cpus=[core])
    try:
        server.start()
    except ServerError as error:
        pytest.fail(f"{error}\n{log.read_text(errors='replace')[-3000:]}")
    yield server.url, server.process.pid, core
    server.stop()


def client(url, **overrides):
    return TeacherServer(**({"url": url, "model": NAME, "top_k": TOP_K, "retries": 1, "timeout": 60} | overrides))


def local_top_k(teacher, row, k):
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(torch.tensor([row])).logits[0, :-1].double(), -1)
    return logprobs.topk(k, -1)


def test_served_top_k_equals_the_same_models_local_top_k(served, tokenizer):
    url, teacher, _ = served
    rows = [tokenizer("In the beginning God created the heaven and the earth.")["input_ids"],
            tokenizer("And the earth was without form")["input_ids"]]
    answers = client(url).top_k_logprobs(rows)
    for row, (ids, logprobs) in zip(rows, answers):
        values, indices = local_top_k(teacher, row, TOP_K)
        assert ids.shape == logprobs.shape == (len(row) - 1, TOP_K)
        np.testing.assert_allclose(logprobs, values.numpy(), atol=2e-4)
        # ids agree except where two log-probs tie within the tolerance
        gaps = np.diff(values.numpy(), axis=-1)
        for t in range(len(row) - 1):
            if np.all(np.abs(gaps[t]) > 1e-3):
                assert ids[t].tolist() == indices[t].tolist()


def test_server_is_checked_at_start(served, tokenizer):
    url, _, _ = served
    assert client(url, model=None).check(tokenizer, 64) == NAME  # the one model served
    with pytest.raises(ServerError, match=r"teacher_server_model='nope' is not served at .* serves \['tiny-teacher'\]"):
        client(url, model="nope").check(tokenizer)
    with pytest.raises(ServerError, match=rf"at most {MAX_MODEL_LEN} tokens a row .*--max-model-len 200"):
        client(url).check(tokenizer, 200)
    other = train_bpe_tokenizer(["completely different words in another tokenizer"] * 20, vocab_size=300)
    with pytest.raises(ServerError, match="tokenizes text differently from the student's tokenizer"):
        client(url).check(other)


def test_a_row_longer_than_the_server_takes_is_a_clear_error(served, tokenizer):
    url, _, _ = served
    with pytest.raises(ServerError, match=r"refused the request \(HTTP 400.*--max-model-len"):
        client(url).top_k_logprobs([[5] * (MAX_MODEL_LEN + 10)])


def test_more_log_probs_than_the_server_serves_is_a_clear_error(served, tokenizer):
    url, _, _ = served
    with pytest.raises(ServerError, match="--max-logprobs 500"):
        client(url, top_k=500).top_k_logprobs([[5, 6, 7]])


def test_cache_from_the_server_matches_the_cache_built_here(served, tokenizer, tmp_path):
    url, teacher, _ = served
    rows = prompt_response_dataset(tokenizer, n=12)
    local = build_cache(teacher, rows, tokenizer, tmp_path / "local", top_k=TOP_K)
    server, asked = client(url), []
    ask = server.top_k_logprobs
    server.top_k_logprobs = lambda batch: asked.append(len(batch)) or ask(batch)
    remote = build_cache(server, rows, tokenizer, tmp_path / "served", top_k=TOP_K, batch_size=8)
    assert asked == [8, 4]  # one request a batch, each row once
    info = [json.loads((path / "cache_info.json").read_text()) for path in (local, remote)]
    assert info[0]["dataset"] == info[1]["dataset"] and info[0]["tokenizer"] == info[1]["tokenizer"]
    assert info[0]["settings"] == info[1]["settings"]
    assert info[1]["teacher_name"] == NAME
    a = Dataset.from_file(str(local / "shard-00000.arrow"))
    b = Dataset.from_file(str(remote / "shard-00000.arrow"))
    for row_a, row_b in zip(a, b):
        np.testing.assert_allclose(row_a["teacher_logprobs"], row_b["teacher_logprobs"], atol=5e-3)  # float16 rows: one ulp at |4| is 0.0039
        same = np.mean(np.array(row_a["teacher_ids"]) == np.array(row_b["teacher_ids"]))
        assert same > 0.95  # ties within float16 may swap neighbours


def served_trainer(tmp_path, url, student, dataset, tokenizer, name="served", **overrides):
    settings = dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, alpha=0.7,
                    teacher_server_url=url, teacher_server_model=NAME, teacher_server_top_k=TOP_K,
                    teacher_server_retries=1)
    return DistillationTrainer(model=student, args=config(tmp_path, **(settings | overrides)), train_dataset=dataset,
                               processing_class=tokenizer)


def test_training_from_the_server_equals_training_from_its_offline_cache(served, tokenizer, tmp_path):
    url, teacher, _ = served
    dataset = prompt_response_dataset(tokenizer, n=12)
    build_cache(teacher, dataset, tokenizer, tmp_path / "cache", top_k=TOP_K)
    student = lambda: small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)  # noqa: E731
    from_server = served_trainer(tmp_path, url, student(), dataset, tokenizer)
    assert from_server.args.dataloader_num_workers == 1  # requests overlap the step
    assert from_server.teacher_model is None and "served" in from_server.teacher_name
    from_server.train()
    from_cache = DistillationTrainer(
        model=student(), args=config(tmp_path, output_dir=str(tmp_path / "cached"), max_steps=3,
                                     per_device_train_batch_size=4, alpha=0.7, teacher_cache=str(tmp_path / "cache")),
        train_dataset=dataset, processing_class=tokenizer,
    )
    from_cache.train()
    logs = [[log for log in t.state.log_history if "kd_loss" in log] for t in (from_server, from_cache)]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=2e-3)
        assert a["ce_loss"] == pytest.approx(b["ce_loss"], rel=2e-3)


def test_resume_with_a_served_teacher(served, tokenizer, tmp_path):
    url, _, _ = served
    dataset = prompt_response_dataset(tokenizer, n=12)
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1, dataloader_num_workers=0)
    whole = served_trainer(tmp_path, url, small_llama(len(tokenizer), 32, 1, seed=1), dataset, tokenizer, "whole", **settings)
    whole.train()
    resumed = served_trainer(tmp_path, url, other_student(tokenizer), dataset, tokenizer, "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    last = [[log for log in t.state.log_history if log.get("step") == 4 and "kd_loss" in log][0] for t in (whole, resumed)]
    # The server's log-probs for a row repeat to ~1e-5, not bit for bit (its batching and caching vary), and Adam
    # turns a tiny gradient's noise into a step of up to lr (1e-3) in either direction; the resumed student started
    # from other weights, which differ from these by far more than that.
    assert last[1]["kd_loss"] == pytest.approx(last[0]["kd_loss"], rel=2e-3)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3, msg=name)
    start = other_student(tokenizer).state_dict()
    assert max((a - start[name]).abs().max().item() for name, a in whole.model.state_dict().items()) > 5e-2


def test_a_recipe_trains_from_the_server_and_its_local_copy_makes_and_scores(served, tokenizer, tmp_path, capsys):
    """`hf-distill train --teacher_server_url`: the local copy of the served model makes the student (by layers) and
    scores the teacher's row; the students train on the server's targets."""
    url, _, folder = served
    out = tmp_path / "run"
    assert main([
        "train", str(REPO / "recipes" / "lm_from_teacher.yaml"), "--teacher_model_name_or_path", str(folder),
        "--teacher_server_url", url, "--teacher_server_top_k", str(TOP_K), "--hidden_loss_weight", "0",
        "--student_num_layers", "1", "--calibration_rows", "4", "--dataset_name", DATA, "--max_train_samples", "48",
        "--max_length", "48", "--output_dir", str(out), *FAST,
    ]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["teacher", "distilled", "baseline (no teacher)"]
    assert all("agreement" in row for row in report["rows"][1:])
    assert any("kd_loss" in log for log in report["histories"]["distilled"])
    assert f"{NAME} (served)" in (out / "README.md").read_text()
    # With the recipe's hidden-state term left on, it is refused in one line before anything loads.
    assert main(["train", str(REPO / "recipes" / "lm_from_teacher.yaml"), "--teacher_model_name_or_path", str(folder),
                 "--teacher_server_url", url, "--output_dir", str(tmp_path / "refused")]) == 2
    assert "a server gives no hidden states; set hidden_loss_weight=0" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_a_recipe_samples_its_student_through_vllm(served, tmp_path, capsys):
    """`hf-distill train --use_vllm`: the distilled student's on-policy samples come from the server (started on the
    student's own starting weights); its no-teacher baseline trains on the data alone."""
    url, _, folder = served
    out = tmp_path / "run"
    try:
        assert main([
            "train", str(REPO / "recipes" / "translation_causal.yaml"), "--teacher_model_name_or_path", str(folder),
            "--teacher_model_init_kwargs", "{}", "--student_model_name_or_path", str(folder), "--dataset_name", DATA,
            "--max_train_samples", "32", "--max_length", "48", "--lmbda", "1", "--max_new_tokens", "4",
            "--use_vllm", "true", "--vllm_server_base_url", url, "--output_dir", str(out), *FAST,
        ]) == 0, capsys.readouterr().err
        assert (out / "vllm-weights" / "model.safetensors").exists()  # the student was sent before its on-policy steps
        assert not (out / "_baseline" / "vllm-weights").exists()
        history = json.loads((out / "report.json").read_text())["histories"]
        assert any("kd_loss" in log for log in history["distilled"])
    finally:
        rollouts = RolloutServer(url, NAME, top_k=TOP_K, retries=1)
        rollouts.request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
        rollouts.request("POST", "/reset_prefix_cache")


# ---- faults, from a stand-in server whose answers are scripted ------------------------------------------------


class Scripted(BaseHTTPRequestHandler):
    script: list = []  # (status, body, delay) answered in turn; the last one repeats
    seen: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Scripted.seen.append(self.path)
        status, body, delay = Scripted.script[min(len(Scripted.seen) - 1, len(Scripted.script) - 1)]
        time.sleep(delay)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def answer(rows, k=2):
    """A well-formed completions answer: every position gives token 5 then 6."""
    entry = {"5": {"logprob": -0.5, "rank": 1}, "6": {"logprob": -1.5, "rank": 2}}
    return {"choices": [{"index": i, "prompt_logprobs": [None] + [entry] * (len(row) - 1)} for i, row in enumerate(rows)]}


def test_a_5xx_and_a_slow_answer_are_retried(scripted):
    Scripted.script = [(503, {"error": {"message": "busy"}}, 0), (200, answer([[1, 2, 3]]), 2.0), (200, answer([[1, 2, 3]]), 0)]
    ids, logprobs = TeacherServer(scripted, "m", top_k=2, retries=3, timeout=1.0).top_k_logprobs([[1, 2, 3]])[0]
    assert len(Scripted.seen) == 3  # 503, then too slow, then answered
    assert ids.tolist() == [[5, 6], [5, 6]] and logprobs.tolist() == [[-0.5, -1.5], [-0.5, -1.5]]


def test_a_server_that_keeps_failing_stops_with_its_url(scripted):
    Scripted.script = [(500, {"error": {"message": "engine died"}}, 0)]
    with pytest.raises(ServerError, match=rf"{scripted}/v1/completions failed 2 times \(HTTP 500: engine died\)"):
        TeacherServer(scripted, "m", top_k=2, retries=1).top_k_logprobs([[1, 2, 3]])


def test_a_server_gone_away_stops_with_its_url():
    url = "http://127.0.0.1:9"  # the discard port: nothing listens
    with pytest.raises(ServerError, match=r"127.0.0.1:9/v1/models failed 1 times \(cannot connect"):
        TeacherServer(url, retries=0).check(None)


def test_a_partial_answer_is_refused_not_trained_on(scripted):
    short = answer([[1, 2, 3]])
    short["choices"][0]["prompt_logprobs"] = short["choices"][0]["prompt_logprobs"][:2]
    Scripted.script = [(200, short, 0)]
    with pytest.raises(ServerError, match="gave log-probs for 2 of a row's 3 positions"):
        TeacherServer(scripted, "m", top_k=2, retries=0).top_k_logprobs([[1, 2, 3]])
    Scripted.seen, Scripted.script = [], [(200, {"choices": []}, 0)]
    with pytest.raises(ServerError, match="answered 0 of 1 rows"):
        TeacherServer(scripted, "m", top_k=2, retries=0).top_k_logprobs([[1, 2, 3]])


def test_the_collator_puts_each_selected_position_s_entry_in_order(scripted, tokenizer):
    """Right-padded rows with a masked prompt: entries come for the label positions only, row-major."""
    rows = [[7, 8, 9, 10], [11, 12]]

    class Positional(Scripted):  # each position's top entry is the id of the token it predicts
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            choices = [{"index": i, "prompt_logprobs": [None] + [{str(tok): {"logprob": -0.1}, "0": {"logprob": -3.0}}
                                                               for tok in row[1:]]} for i, row in enumerate(body["prompt"])]
            payload = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Positional)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        features = [{"input_ids": rows[0], "attention_mask": [1] * 4, "labels": [-100, -100, 9, 10]},
                    {"input_ids": rows[1], "attention_mask": [1] * 2, "labels": [-100, 12]}]
        collate = ServedTeacherCollator(default_collator(CAUSAL, tokenizer),
                                        TeacherServer(f"http://127.0.0.1:{server.server_address[1]}", "m", top_k=2))
        batch = collate(features)
    finally:
        server.shutdown()
    assert batch["teacher_ids"][:, 0].tolist() == [9, 10, 12]  # positions 1, 2 of row 0 and 0 of row 1
    assert batch["teacher_logprobs"].shape == (3, 2) and batch["teacher_lse"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(temperature=2.0), "temperature=2.0: a server gives log-probabilities at temperature 1 only"),
        (dict(loss_type="mse"), "loss_type='mse': a server gives log-probabilities, not logits"),
        (dict(hidden_loss_weight=1.0), "hidden_loss_weight=1.0: a server gives no hidden states"),
        (dict(teacher_cache="cache/"), "teacher_cache='cache/': train from one or the other"),
        (dict(teacher_server_top_k=0), "teacher_server_top_k=0 must be a whole number >= 1"),
        (dict(teacher_server_url="localhost:8000"), "teacher_server_url='localhost:8000' must be an http"),
        (dict(teacher_server_url=None, use_vllm=True), "use_vllm=True generates the student's on-policy responses, "
         "but lmbda=0"),
        (dict(teacher_server_url=None, use_vllm=True, lmbda=1.0), "use_vllm=True needs vllm_server_base_url"),
        (dict(teacher_server_url=None, use_vllm=True, lmbda=1.0, vllm_mode="colocate", vllm_server_base_url="http://h:1"),
         "vllm_mode='colocate' runs vLLM inside the training process; vllm_server_base_url is for vllm_mode='server'"),
        (dict(teacher_server_url=None, use_vllm=True, lmbda=1.0, vllm_mode="colocate", vllm_gpu_memory_utilization=1.5),
         "vllm_gpu_memory_utilization=1.5 must be a share in (0, 1]"),
        (dict(teacher_server_url=None, use_vllm=True, lmbda=1.0, vllm_mode="colocate", vllm_max_model_length=1),
         "vllm_max_model_length=1 must be a whole number >= 2"),
        (dict(teacher_server_url=None, use_vllm=True, lmbda=1.0, vllm_mode="remote"),
         "vllm_mode='remote' must be 'server' or 'colocate'"),
        (dict(teacher_server_url=None, use_vllm=True, lmbda=1.0, vllm_server_base_url="http://h:1",
              vllm_sync_interval=0), "vllm_sync_interval=0 must be a whole number >= 1"),
        (dict(teacher_server_url=None, vllm_sync_adapters=True), "vllm_sync_adapters=True sends a LoRA student's "
         "adapters to its vLLM server, but use_vllm is off"),
    ],
)
def test_settings_a_served_teacher_cannot_take_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(tmp_path, **({"teacher_server_url": "http://localhost:8000"} | overrides))


def spy_batches(trainer):
    """The batches compute_loss sees (on the CPU)."""
    seen, original = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append({key: value.cpu() for key, value in inputs.items() if torch.is_tensor(value)})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    return seen


def test_seq_kd_answers_come_from_the_server_and_train(served, tokenizer, tmp_path):
    url, teacher, _ = served
    prompts = prompt_response_dataset(tokenizer, n=8, max_length=24)
    trainer = served_trainer(tmp_path, url, small_llama(len(tokenizer), 32, 1, seed=1), prompts, tokenizer, "seq_kd",
                             seq_kd=True, max_new_tokens=6, max_steps=2, dataloader_num_workers=0)
    seen = spy_batches(trainer)
    trainer.train()
    assert len(seen) == 2 and "teacher_ids" in seen[0]
    batch = seen[0]  # the server's greedy answers are the same model's greedy answers here
    for row, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        start = next(i for i, label in enumerate(labels) if label != -100)
        response = [label for label in labels if label != -100]
        with torch.no_grad():
            local = teacher.generate(torch.tensor([row[:start]]), max_new_tokens=6, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=0)[0, start:].tolist()
        assert response == local[: len(response)] and 1 <= len(response) <= 6
    assert all(np.isfinite(log["kd_loss"]) for log in trainer.state.log_history if "kd_loss" in log)


def test_on_policy_samples_are_scored_by_the_server(served, tokenizer, tmp_path):
    url, teacher, _ = served
    prompts = prompt_response_dataset(tokenizer, n=8, max_length=24)
    trainer = served_trainer(tmp_path, url, small_llama(len(tokenizer), 32, 1, seed=1), prompts, tokenizer, "gkd",
                             lmbda=1.0, alpha=1.0, max_new_tokens=6, max_steps=2, dataloader_num_workers=0)
    seen = spy_batches(trainer)
    trainer.train()
    assert len(seen) == 2
    batch = seen[0]  # the served teacher's log-probs of the student's samples, at the response positions
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    values, _ = local_top_k(teacher, row, TOP_K)
    positions = (batch["labels"][0][1:] != -100).nonzero().flatten()
    assert len(positions) >= 1
    np.testing.assert_allclose(batch["teacher_logprobs"][: len(positions)].numpy(), values[positions].numpy(), atol=2e-4)


def test_a_rollout_server_without_dev_mode_is_a_clear_error(scripted):
    Scripted.script = [(200, {"data": [{"id": "m"}]}, 0), (404, {"detail": "Not Found"}, 0)]
    with pytest.raises(ServerError, match="cannot take new weights: start it with VLLM_SERVER_DEV_MODE=1"):
        RolloutServer(scripted, retries=0).check(None)
    assert Scripted.seen == ["/v1/models", "/reset_prefix_cache"]


def test_a_rollout_server_without_lora_routes_is_a_clear_error_with_vllm_sync_adapters(scripted):
    Scripted.script = [(200, {"data": [{"id": "m"}]}, 0), (200, {}, 0), (404, {"detail": "Not Found"}, 0)]
    server = RolloutServer(scripted, retries=0, sync_adapters=True)
    with pytest.raises(ServerError, match="cannot take LoRA adapters .* --enable-lora --max-lora-rank R .* "
                                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        server.check(None)
    assert Scripted.seen == ["/v1/models", "/reset_prefix_cache", "/v1/unload_lora_adapter"]
    # A server with the routes answers that our adapter is not loaded (yet): that passes.
    Scripted.seen = []
    Scripted.script = [(200, {"data": [{"id": "m"}]}, 0), (200, {}, 0),
                       (404, {"error": {"message": "The lora adapter 'hf-distill-student' cannot be found."}}, 0)]
    assert server.check(None) == "m"


@pytest.mark.parametrize("student, message", [
    ("plain", "the student is not a PEFT model"),
    ("modules_to_save", r"also trains whole modules \(\['lm_head'\], modules_to_save\)"),
])
def test_vllm_sync_adapters_needs_a_lora_student_with_all_its_training_in_adapters(tokenizer, tmp_path, student,
                                                                                   message):
    if student == "modules_to_save":
        model = lora_student(tokenizer)
    else:
        model = small_llama(len(tokenizer), hidden_size=32, num_layers=1, seed=1)
    args = config(tmp_path, lmbda=1.0, use_vllm=True, vllm_server_base_url="http://127.0.0.1:9",
                  vllm_sync_adapters=True)
    with pytest.raises(ValueError, match=f"vllm_sync_adapters=True.*{message}.*set vllm_sync_adapters=False"):
        DistillationTrainer(model=model, teacher_model=tiny_teacher(tokenizer), args=args,
                            train_dataset=prompt_response_dataset(tokenizer, n=4), processing_class=tokenizer)


# Last: it sends other weights to the module's server (and puts the teacher's back).
def test_use_vllm_samples_the_current_student_on_the_server(served, tokenizer, tmp_path):
    url, teacher, folder = served
    student = small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=3, num_attention_heads=2,
                          num_key_value_heads=2)
    prompts = prompt_response_dataset(tokenizer, n=8, max_length=24)
    args = config(tmp_path, lmbda=1.0, alpha=1.0, use_vllm=True, vllm_server_base_url=url, max_new_tokens=6,
                  max_steps=3, vllm_sync_interval=2, learning_rate=1e-2, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                  processing_class=tokenizer)
    pushes = []  # (folder, the weights sent)
    push = trainer.responses.rollouts.push_weights
    trainer.responses.rollouts.push_weights = lambda model, path, weights=None: (
        pushes.append((path, {k: v.clone() for k, v in model.state_dict().items()})), push(model, path, weights))
    seen = spy_batches(trainer)
    rollouts = RolloutServer(url, NAME, top_k=TOP_K, retries=1)
    row = prompt_response_dataset(tokenizer, n=1)[0]["input_ids"]
    try:
        trainer.train()
        assert len(pushes) == 2  # steps 0 and 2, with vllm_sync_interval=2
        assert pushes[0][0] == str(tmp_path / "out" / "vllm-weights")
        assert len(seen) == 3 and all((batch["labels"] != -100).any() for batch in seen)
        # The server computes with the weights training sent last (step 2's), not the teacher's it started on.
        sent = small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=0, num_attention_heads=2,
                           num_key_value_heads=2)
        sent.load_state_dict(pushes[-1][1])
        assert any(not torch.equal(a, pushes[0][1][name]) for name, a in pushes[-1][1].items())  # it trained
        ids, logprobs = rollouts.top_k_logprobs([row])[0]
        values, indices = local_top_k(sent.eval(), row, TOP_K)
        np.testing.assert_allclose(logprobs, values.numpy(), atol=2e-4)
        assert (ids == indices.numpy()).mean() > 0.95
        teacher_values, _ = local_top_k(teacher, row, TOP_K)
        assert np.abs(logprobs - teacher_values.numpy()).max() > 0.1
    finally:
        rollouts.request("POST", "/collective_rpc", {"method": "reload_weights",
                                                      "kwargs": {"weights_path": str(folder)}})
        rollouts.request("POST", "/reset_prefix_cache")
    assert all(np.isfinite(log["kd_loss"]) for log in trainer.state.log_history if "kd_loss" in log)


def test_use_vllm_colocate_samples_the_current_student_in_the_training_process(tmp_path):
    """vllm_mode="colocate": a vLLM engine inside the training process writes the on-policy responses and is handed
    the student's weights in memory; after training it computes with the weights sent last. Run in vLLM's environment
    (hf_distill installed there too) by tests/colocated_run.py."""
    if not os.path.exists(VLLM_PYTHON):
        pytest.skip(f"vLLM is not installed at {VLLM_PYTHON} (.ci/run installs it; see docs/served_teacher.md)")
    if subprocess.run([VLLM_PYTHON, "-c", "import hf_distill"], capture_output=True).returncode:
        pytest.skip(f"hf_distill is not installed next to vLLM in {VLLM_PYTHON} (.ci/run installs it)")
    done = subprocess.run([VLLM_PYTHON, str(REPO / "tests" / "colocated_run.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"pushes"')][-1])
    assert result["pushes"] == 2 and result["trained"]  # steps 0 and 2 (vllm_sync_interval=2), and it trained
    assert result["answered"] == [4, 4, 4]  # every step's prompts answered by the engine
    np.testing.assert_allclose(result["engine_logprobs"], result["sent_logprobs"], atol=2e-4)
    assert np.abs(np.array(result["engine_logprobs"]) - result["start_logprobs"]).max() > 0.1
    assert len(result["kd_loss"]) == 3 and np.isfinite(result["kd_loss"]).all()
    assert result["threads_kept"]  # the engine left the trainer's threads and cores as they were


def test_use_vllm_colocate_without_vllm_here_is_a_clear_error(tokenizer, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM imports in this environment")
    args = config(tmp_path, lmbda=1.0, use_vllm=True, vllm_mode="colocate", max_new_tokens=2, max_steps=1)
    with pytest.raises(ImportError, match="vllm_mode='colocate' runs vLLM inside the training process, but it does "
                       "not import here .* use vllm_mode='server'"):
        DistillationTrainer(model=small_llama(len(tokenizer), 32, 1, seed=1), teacher_model=tiny_teacher(tokenizer),
                            args=args, train_dataset=prompt_response_dataset(tokenizer, n=4), processing_class=tokenizer)


def lora_student(tokenizer, seed=3):
    """A LoRA student on the served architecture, its adapters (and the lm_head it saves whole) moved off zero."""
    from peft import LoraConfig, get_peft_model

    base = small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=seed, num_attention_heads=2,
                       num_key_value_heads=2)
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return student


def test_a_peft_students_weights_are_sent_merged_and_its_adapters_kept(tokenizer, tmp_path):
    student = lora_student(tokenizer).eval()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    model, weights = served_weights(student)
    names = sorted(weights)
    model.save_pretrained(tmp_path / "sent", state_dict=weights)
    sent = AutoModelForCausalLM.from_pretrained(tmp_path / "sent").eval()
    assert sorted(sent.state_dict()) == names  # every weight of the plain model, named as it names them
    row = torch.tensor([prompt_response_dataset(tokenizer, n=1)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(sent(row).logits, student(row).logits, rtol=0, atol=1e-5)
        with student.disable_adapter():  # the adapters matter: without them the logits are others
            assert (sent(row).logits - student(row).logits).abs().max() > 1e-2
    for name, value in student.state_dict().items():  # unmerged again: training goes on from its own weights
        torch.testing.assert_close(value, before[name], rtol=0, atol=1e-6, msg=name)


def test_use_vllm_with_a_peft_student_serves_it_merged(served, tokenizer, tmp_path):
    """The server computes with the PEFT student as it was when its weights were sent: adapters merged in."""
    url, teacher, folder = served
    student = lora_student(tokenizer)
    prompts = prompt_response_dataset(tokenizer, n=4, max_length=24)
    args = config(tmp_path, lmbda=1.0, alpha=1.0, use_vllm=True, vllm_server_base_url=url, max_new_tokens=4,
                  max_steps=1, learning_rate=1e-2, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                  processing_class=tokenizer)
    row = prompt_response_dataset(tokenizer, n=1)[0]["input_ids"]
    expected = []
    push = trainer.responses.rollouts.push_weights
    trainer.responses.rollouts.push_weights = lambda model, path, weights=None: (
        expected.append(local_top_k(model.eval(), row, TOP_K)), model.train(), push(model, path, weights))
    rollouts = RolloutServer(url, NAME, top_k=TOP_K, retries=1)
    try:
        trainer.train()
        assert len(expected) == 1
        ids, logprobs = rollouts.top_k_logprobs([row])[0]
        np.testing.assert_allclose(logprobs, expected[0].values.numpy(), atol=2e-4)
        assert (ids == expected[0].indices.numpy()).mean() > 0.95
        assert np.abs(logprobs - local_top_k(teacher, row, TOP_K).values.numpy()).max() > 0.1
    finally:
        rollouts.request("POST", "/collective_rpc", {"method": "reload_weights",
                                                      "kwargs": {"weights_path": str(folder)}})
        rollouts.request("POST", "/reset_prefix_cache")


def test_use_vllm_sends_a_lora_students_adapters_alone(served, lora_served, tokenizer, tmp_path):
    """vllm_sync_adapters: the server samples the student's adapter as it was last sent (in place, every step), on
    top of the base it started on, which stays as it was; only adapter files are written."""
    from peft import LoraConfig, get_peft_model

    _, teacher, _ = served
    url, pid, core = lora_served
    import psutil

    server = psutil.Process(pid)  # `cpus`: the server and every process it started stay on the core given
    assert {tuple(process.cpu_affinity()) for process in [server, *server.children(recursive=True)]} == {(core,)}
    base = small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=0, num_attention_heads=2,
                       num_key_value_heads=2)
    sharpen(base, 5.0)  # the served teacher's weights: the server's base is the student's base
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    prompts = prompt_response_dataset(tokenizer, n=8, max_length=24)
    # alpha 0.5: the student starts as its teacher, so the KD term alone would give no gradient.
    args = config(tmp_path, lmbda=1.0, alpha=0.5, use_vllm=True, vllm_server_base_url=url, vllm_sync_adapters=True,
                  max_new_tokens=4, max_steps=2, learning_rate=5e-2, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                  processing_class=tokenizer)
    row = prompt_response_dataset(tokenizer, n=1)[0]["input_ids"]
    expected = []  # the student's top-k at each send
    push = trainer.responses.rollouts.push_weights
    trainer.responses.rollouts.push_weights = lambda model, path, weights=None: (
        expected.append(local_top_k(model.eval(), row, TOP_K)), model.train(), push(model, path, weights))
    adapter = RolloutServer(url, RolloutServer.adapter, top_k=TOP_K, retries=1)
    try:
        trainer.train()
        assert len(expected) == 2  # steps 0 and 1
        sent = os.listdir(args.vllm_weights_dir)
        assert "adapter_model.safetensors" in sent and not any(name.startswith("model") for name in sent)
        assert np.abs(expected[1].values.numpy() - expected[0].values.numpy()).max() > 1e-3  # it trained
        ids, logprobs = adapter.top_k_logprobs([row])[0]
        np.testing.assert_allclose(logprobs, expected[1].values.numpy(), atol=2e-4)
        assert (ids == expected[1].indices.numpy()).mean() > 0.95
        _, base_logprobs = client(url).top_k_logprobs([row])[0]  # the base model, as it started
        np.testing.assert_allclose(base_logprobs, local_top_k(teacher, row, TOP_K).values.numpy(), atol=2e-4)
    finally:
        adapter.request("POST", "/v1/unload_lora_adapter", {"lora_name": RolloutServer.adapter}, text=True)


def test_use_vllm_gathers_a_sharded_student_whole_for_the_server(served, tokenizer, tmp_path):
    """FSDP2 on 2 processes (gloo): every process takes part in gathering the student's shards, the main one sends
    them, and the server then computes with the whole trained weights."""
    url, teacher, folder = served
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DISTILL_TEST_VLLM_URL": url,
           "HF_DISTILL_TEST_VLLM_MODEL_DIR": str(folder)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rollouts = RolloutServer(url, NAME, top_k=TOP_K, retries=1)
    row = prompt_response_dataset(tokenizer, n=1)[0]["input_ids"]
    try:
        subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                        str(REPO / "tests" / "distributed_train.py"), str(tmp_path), "2", "fsdp2_vllm"],
                       check=True, env=env, timeout=600)
        rank0 = torch.load(tmp_path / "rank0.pt")
        assert rank0["fsdp"] and rank0["world_size"] == 2
        assert all(np.isfinite(log["kd_loss"]) for log in rank0["logs"] if "kd_loss" in log)
        # The folder holds the weights sent last (before step 2): whole (they load at the model's shapes) and trained.
        sent = AutoModelForCausalLM.from_pretrained(tmp_path / "vllm-weights").eval()
        start = small_llama(len(tokenizer), hidden_size=128, num_layers=2, seed=3, num_attention_heads=2,
                            num_key_value_heads=2).state_dict()
        assert max((value - start[name]).abs().max().item() for name, value in sent.state_dict().items()) > 1e-3
        ids, logprobs = rollouts.top_k_logprobs([row])[0]
        values, indices = local_top_k(sent, row, TOP_K)
        np.testing.assert_allclose(logprobs, values.numpy(), atol=2e-4)
        assert (ids == indices.numpy()).mean() > 0.95
    finally:
        rollouts.request("POST", "/collective_rpc", {"method": "reload_weights",
                                                      "kwargs": {"weights_path": str(folder)}})
        rollouts.request("POST", "/reset_prefix_cache")
