"""Resuming equals the uninterrupted run (logs and weights); kill -9 while training or while saving a checkpoint;
an output_dir that holds a run is never overwritten, by the trainer or by a recipe run."""

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hf_distill import DistillationConfig
from hf_distill.cache import build_cache
from hf_distill.checkpoints import DISTILL_STATE_NAME, is_complete_checkpoint, last_complete_checkpoint
from hf_distill.runner.pipeline import resume_points
from hf_distill.runner.scratch import small_llama

from conftest import (
    DATA,
    REPO,
    assert_same_logs,
    logs_after,
    other_student,
    prompt_response_dataset,
    run_with_checkpoints,
    weights,
    with_dropout,
)
from resume_train import MAX_STEPS, SlowSteps, make_trainer

HERE = Path(__file__).resolve().parent


def file_hashes(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): hashlib.sha256(Path(root, name).read_bytes()).hexdigest()
        for root, _, names in os.walk(folder) for name in names
    }


# ---- resuming equals the uninterrupted run -------------------------------------------------------

SCENARIOS = {
    "live_teacher": {},
    "teacher_cache": {"teacher_cache": True},
    "projections_and_accumulation": {
        "hidden_loss_weight": 1.0, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2,
    },
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resume_equals_the_uninterrupted_run(tmp_path, causal_pair, tokenizer, scenario):
    """From checkpoint-4 (mid-epoch, between logs at 3 and 6), from other weights: the same logs and weights."""
    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=12)
    overrides = dict(SCENARIOS[scenario])
    if overrides.pop("teacher_cache", False):
        overrides["teacher_cache"] = str(build_cache(teacher, dataset, tokenizer, tmp_path / "cache", temperature=2.0))
        teacher = None
    reference = run_with_checkpoints(tmp_path, "uninterrupted", teacher, with_dropout(student), dataset, tokenizer, **overrides)
    checkpoint = tmp_path / "uninterrupted" / "checkpoint-4"
    start = other_student(tokenizer)
    resumed = run_with_checkpoints(tmp_path, "resumed", teacher, start, dataset, tokenizer, resume=str(checkpoint), **overrides)

    expected = logs_after(reference, 4)
    assert [log["step"] for log in expected] == [6]
    assert "kd_loss" in expected[0] and ("hidden_loss" in expected[0]) == ("hidden_loss_weight" in overrides)
    assert_same_logs(logs_after(resumed, 4), expected)
    if "hidden_loss_weight" in overrides:
        assert hasattr(reference.model, "distill_projections")  # hidden sizes 32 vs 64
    torch.testing.assert_close(weights(resumed.model), weights(reference.model), rtol=1e-5, atol=1e-6)

    if scenario == "live_teacher":
        # Without the sums saved in the checkpoint, the log at step 6 would cover steps 5-6 only.
        bare = tmp_path / "bare" / "checkpoint-4"
        shutil.copytree(checkpoint, bare)
        os.remove(bare / DISTILL_STATE_NAME)
        unsummed = run_with_checkpoints(tmp_path, "unsummed", teacher, other_student(tokenizer), dataset, tokenizer, resume=str(bare))
        log = logs_after(unsummed, 4)[0]
        assert log["kd_loss"] != pytest.approx(expected[0]["kd_loss"], rel=1e-3)
        assert log["loss"] != pytest.approx(expected[0]["loss"], rel=1e-3)


# ---- kills ---------------------------------------------------------------------------------------


def test_kill_while_saving_falls_back_to_the_previous_checkpoint(tmp_path, causal_pair, tokenizer):
    """A checkpoint cut short (no trainer_state.json, which Trainer writes last) is skipped by resume=True."""
    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=12)
    reference = run_with_checkpoints(tmp_path, "uninterrupted", teacher, with_dropout(student), dataset, tokenizer)
    killed = tmp_path / "killed"
    for step in (2, 4, 6):
        shutil.copytree(tmp_path / "uninterrupted" / f"checkpoint-{step}", killed / f"checkpoint-{step}")
    half = killed / "checkpoint-6"  # killed while writing it: weights cut in half, no trainer_state.json yet
    os.remove(half / "trainer_state.json")
    model_file = half / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    assert last_complete_checkpoint(killed) == str(killed / "checkpoint-4")
    cut_state = tmp_path / "cut_state"  # killed while writing trainer_state.json itself
    shutil.copytree(killed / "checkpoint-4", cut_state)
    state_text = (cut_state / "trainer_state.json").read_text()
    (cut_state / "trainer_state.json").write_text(state_text[: len(state_text) // 2])
    assert not is_complete_checkpoint(cut_state) and is_complete_checkpoint(killed / "checkpoint-4")

    with pytest.raises(ValueError, match="already holds a run"):
        run_with_checkpoints(tmp_path, "killed", teacher, other_student(tokenizer), dataset, tokenizer)
    with pytest.raises(ValueError, match=r"checkpoint-6'? is not a complete checkpoint.*last complete .*checkpoint-4"):
        run_with_checkpoints(tmp_path, "killed", teacher, other_student(tokenizer), dataset, tokenizer, resume=str(half))
    kept = file_hashes(killed / "checkpoint-4")
    resumed = run_with_checkpoints(tmp_path, "killed", teacher, other_student(tokenizer), dataset, tokenizer, resume=True)
    assert resumed.state.global_step == 7
    assert_same_logs(logs_after(resumed, 4), logs_after(reference, 4))
    torch.testing.assert_close(weights(resumed.model), weights(reference.model), rtol=1e-5, atol=1e-6)
    assert file_hashes(killed / "checkpoint-4") == kept
    assert is_complete_checkpoint(half)  # written again, whole
    assert model_file.stat().st_size == (tmp_path / "uninterrupted" / "checkpoint-6" / "model.safetensors").stat().st_size


def test_kill_9_while_training_then_resume(tmp_path, causal_pair, tokenizer):
    """SIGKILL a training subprocess after a checkpoint; resume=True ends where an uninterrupted run ends."""
    teacher, student = causal_pair
    work = tmp_path / "work"
    teacher.save_pretrained(work / "teacher")
    student.config.attention_dropout = 0.2  # as with_dropout: the RNG state must survive the kill too
    student.save_pretrained(work / "student")
    tokenizer.save_pretrained(work / "tokenizer")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "resume_train.py"), str(work), str(out), "4"],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        )

    def kill_after_first_checkpoints():
        deadline = time.time() + 120
        while not is_complete_checkpoint(out / "checkpoint-4") and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_checkpoints)
    killer.start()
    reference = make_trainer(work, tmp_path / "reference")  # meanwhile, the same run without a stop
    reference.train()
    killer.join()
    assert process.wait() == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]

    checkpoint = last_complete_checkpoint(out)
    step = int(checkpoint.rsplit("-", 1)[1])
    assert 4 <= step < MAX_STEPS  # killed while training, after checkpoint-4
    complete = [name for name in os.listdir(out) if is_complete_checkpoint(out / name)]
    kept = {name: file_hashes(out / name) for name in complete}

    resumed = make_trainer(work, out, student=other_student(tokenizer))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == MAX_STEPS
    assert_same_logs(logs_after(resumed, step), logs_after(reference, step))
    torch.testing.assert_close(weights(resumed.model), weights(reference.model), rtol=1e-5, atol=1e-6)
    assert {name: file_hashes(out / name) for name in complete} == kept  # nothing the killed run saved is lost
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert is_complete_checkpoint(out / f"checkpoint-{MAX_STEPS}")


# ---- existing output_dir ---------------------------------------------------------------------------


def test_an_output_dir_holding_a_run_is_not_overwritten(tmp_path, causal_pair, tokenizer):
    teacher, student = causal_pair
    dataset = prompt_response_dataset(tokenizer, n=8)
    first = run_with_checkpoints(tmp_path, "done", teacher, copy.deepcopy(student), dataset, tokenizer, max_steps=2, save_strategy="no")
    first.save_model()
    before = file_hashes(tmp_path / "done")
    with pytest.raises(ValueError, match=r"output_dir '.*done' already holds a run \(training_args.bin\).*choose another"):
        run_with_checkpoints(tmp_path, "done", teacher, copy.deepcopy(student), dataset, tokenizer, max_steps=2, save_strategy="no")
    assert file_hashes(tmp_path / "done") == before
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        run_with_checkpoints(tmp_path, "done", teacher, copy.deepcopy(student), dataset, tokenizer, max_steps=2, resume=True)
    # A folder without a run (here: the user's notes) is trained into.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "notes.txt").write_text("mine")
    run_with_checkpoints(tmp_path, "fresh", teacher, copy.deepcopy(student), dataset, tokenizer, max_steps=2, save_steps=2)
    assert is_complete_checkpoint(tmp_path / "fresh" / "checkpoint-2")


def test_recipe_run_refuses_or_resumes_its_folders(tmp_path, capsys):
    """train_recipe checks output_dir (report files too) and output_dir/_baseline before anything loads."""
    out = tmp_path / "run"

    def points(resume=None, baseline=True):
        args = DistillationConfig(output_dir=str(out), report_to=[], use_cpu=True, resume_from_checkpoint=resume)
        return resume_points(args, baseline)

    assert points() == {"distilled": None, "baseline": None}
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(ValueError, match=r"'.*run' already holds a run \(report.json\)"):
        points()
    assert points("true") == {"distilled": None, "baseline": None}  # nothing trained yet: both start
    os.remove(out / "report.json")
    for folder in (out / "_baseline" / "checkpoint-2", out / "_baseline" / "checkpoint-4"):
        folder.mkdir(parents=True)
    (out / "_baseline" / "checkpoint-2" / "trainer_state.json").write_text("{}")  # checkpoint-4 is cut short
    with pytest.raises(ValueError, match=r"_baseline' already holds a run \(checkpoint-2, checkpoint-4\).*Resume it"):
        points()
    assert points(baseline=False) == {"distilled": None}
    assert points("true") == {"distilled": None, "baseline": str(out / "_baseline" / "checkpoint-2")}

    from hf_distill.runner.cli import main

    models = {name: tmp_path / name for name in ("teacher", "student")}  # never loaded: the check comes first
    for folder in models.values():
        small_llama(64, hidden_size=32, num_layers=1).save_pretrained(folder)
    code = main(["train", str(REPO / "recipes" / "translation_causal.yaml"), "--dataset_name", str(DATA),
                 "--teacher_model_name_or_path", str(models["teacher"]), "--student_model_name_or_path",
                 str(models["student"]), "--output_dir", str(out), "--bf16", "false", "--use_cpu", "true"])
    assert code == 2 and "_baseline' already holds a run" in capsys.readouterr().err
