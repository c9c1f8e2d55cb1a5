"""Two processes on the CPU (gloo) through torchrun: ranks stay in sync and match one process on the joint batch."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    subprocess.run([sys.executable, str(SCRIPT), str(single), "4"], check=True, env=env, timeout=300)
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(SCRIPT), str(double), "2"],
        check=True, env=env, timeout=300,
    )
    alone = torch.load(single / "rank0.pt")
    rank0, rank1 = torch.load(double / "rank0.pt"), torch.load(double / "rank1.pt")
    assert rank0["world_size"] == 2 and alone["world_size"] == 1
    torch.testing.assert_close(rank0["params"], rank1["params"], rtol=0, atol=0)
    torch.testing.assert_close(rank0["params"], alone["params"], rtol=1e-5, atol=1e-6)
    # Logged kd/ce losses are over the joint batch too.
    assert rank0["logs"][0]["kd_loss"] == pytest.approx(alone["logs"][0]["kd_loss"], rel=1e-4)
    assert rank0["logs"][0]["ce_loss"] == pytest.approx(alone["logs"][0]["ce_loss"], rel=1e-4)
