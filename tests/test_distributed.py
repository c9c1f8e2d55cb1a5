"""Two processes on the CPU (gloo) through torchrun: ranks stay in sync and match one process on the joint batch.

DDP, and FSDP2 through the real Trainer -> accelerate -> `fully_shard` path (see tests/distributed_train.py).
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).with_name("distributed_train.py")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(tmp_path, per_device_batch: int, mode: str, grad_accum: int = 1, hidden_weight: float = 0.0):
    """Train alone on batch 2B, then on 2 processes x batch B; the results of (alone, rank 0, rank 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    settings = [str(grad_accum), str(hidden_weight)]
    subprocess.run([sys.executable, str(SCRIPT), str(single), str(2 * per_device_batch), "ddp", *settings],
                   check=True, env=env, timeout=300)
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(SCRIPT), str(double), str(per_device_batch), mode, *settings],
        check=True, env=env, timeout=300,
    )
    results = [torch.load(single / "rank0.pt"), torch.load(double / "rank0.pt"), torch.load(double / "rank1.pt")]
    return *results, double


def assert_same_training(alone, rank0, rank1):
    assert rank0["world_size"] == 2 and alone["world_size"] == 1
    torch.testing.assert_close(rank0["params"], rank1["params"], rtol=0, atol=0)
    torch.testing.assert_close(rank0["grads"], alone["grads"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rank0["params"], alone["params"], rtol=1e-5, atol=1e-6)
    for key in ("loss", "kd_loss", "ce_loss", "hidden_loss"):  # logged over the joint batch too
        for mine, reference in zip(rank0["logs"][:2], alone["logs"][:2]):
            assert (key in mine) == (key in reference)
            if key in mine:
                assert mine[key] == pytest.approx(reference[key], rel=1e-5)
    for key in ("eval_loss", "eval_kd_loss", "eval_ce_loss"):
        assert rank0["eval"][key] == pytest.approx(alone["eval"][key], rel=1e-5)


@needs_torchrun
def test_ddp_two_processes_match_one(tmp_path):
    alone, rank0, rank1, _ = run(tmp_path, 2, "ddp")
    assert_same_training(alone, rank0, rank1)


@needs_torchrun
def test_fsdp2_two_processes_match_one(tmp_path):
    """Student and teacher sharded by FSDP2, with accumulation and hidden-state projections: same training as
    one process, the chunked loss on for both (the heads gathered for it), each rank holding half the teacher."""
    alone, rank0, rank1, out = run(tmp_path, 2, "fsdp2", grad_accum=2, hidden_weight=1.0)
    assert rank0["fsdp"] and not alone["fsdp"]
    assert_same_training(alone, rank0, rank1)
    assert "hidden_loss" in rank0["logs"][0]
    for rank in (rank0, rank1):
        assert rank["chunked"] == {"student": True, "teacher": True}  # no full-logits fallback
        held, whole = rank["teacher_bytes"]
        assert held == pytest.approx(whole / 2, rel=0.05)
        assert rank["teacher_sharded"]  # resharded after every step: no rank kept a whole replica
    # The checkpoint holds the student and its projections, never the teacher; the export, the student alone.
    checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    assert any(key.startswith("distill_projections.") for key in checkpoint)
    assert sum(t.numel() for t in checkpoint.values()) == rank0["params"].numel()
    exported = AutoModelForCausalLM.from_pretrained(out / "exported")
    params = torch.cat([p.detach().flatten() for p in exported.parameters()])
    torch.testing.assert_close(params, rank0["params"][: params.numel()], rtol=0, atol=0)
    assert params.numel() < rank0["params"].numel()  # the projections stayed out


@needs_torchrun
def test_fsdp2_on_policy_generation_keeps_ranks_in_step(tmp_path):
    """lmbda=1 with the student and teacher sharded: the ranks' generations end at different lengths (each rank's
    room depends on its own prompts), and yet every rank goes through the same collectives and ends in sync."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(SCRIPT), str(tmp_path), "2", "fsdp2_on_policy"],
        check=True, env=env, timeout=300,
    )
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["fsdp"] and rank0["chunked"] == {"student": True, "teacher": True}
    assert len(rank0["generated"]) == len(rank1["generated"]) == 2  # one generation per step on each rank
    assert rank0["generated"] != rank1["generated"]  # the ranks did not need the same number of forwards
    assert all(log.get("on_policy_fraction", 1.0) == 1.0 for log in rank0["logs"])
    torch.testing.assert_close(rank0["params"], rank1["params"], rtol=0, atol=0)


@needs_torchrun
def test_zero3_teacher_is_partitioned(tmp_path):
    """DeepSpeed ZeRO-3 places the teacher as a partitioned inference engine: same logits, half the weights a rank,
    and seq_kd's generation kept in step across ranks (a rank done early must go on forwarding, or the other hangs)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(SCRIPT.with_name("zero3_teacher.py")), str(tmp_path)],
        check=True, env=env, timeout=300,
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["sharded"], result["whole"], rtol=1e-5, atol=1e-5)
        assert result["held"] == pytest.approx(result["total"] / 2, rel=0.05)
        assert not result["trainable"]
        assert not result["chunkable"]  # a ZeRO-3 head: full logits at the target positions, with a warning
        # seq_kd: the partitioned teacher answers as the whole one does, though the ranks generate different lengths
        for key in ("input_ids", "attention_mask", "labels"):
            torch.testing.assert_close(result["answered"][key], result["answered_whole"][key], rtol=0, atol=0)
        assert (result["answered"]["labels"] != -100).any()
    generated = [int((torch.load(tmp_path / f"rank{rank}.pt")["answered"]["labels"] != -100).sum(1).max()) for rank in range(2)]
    assert generated[0] < generated[1]  # rank 0 ran out of room first and kept forwarding until rank 1 had finished


@pytest.mark.parametrize("name, kind, field, value", [
    ("fsdp2", "FSDP", ("fsdp_config", "fsdp_version"), 2),
    ("zero3", "DEEPSPEED", ("deepspeed_config", "zero_stage"), 3),
])
def test_launch_configs_parse(name, kind, field, value):
    """The README's `accelerate launch --config_file` files are valid accelerate configs of the kind they claim."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(Path(__file__).parents[1] / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    assert getattr(config, field[0])[field[1]] == value
