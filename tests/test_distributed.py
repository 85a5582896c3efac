"""Data parallel over prompts with torchrun on the gloo backend: 2 ranks == 1 rank on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).with_name("dist_worker.py"))


def _run(out: Path, ranks: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if ranks == 1:
        cmd = [sys.executable, WORKER, str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(29500 + os.getpid() % 1000), WORKER, str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_ranks_match_one_rank(tmp_path, loss_type):
    one = _run(tmp_path / "one", 1, "--loss_type", loss_type)
    two = _run(tmp_path / "two", 2, "--loss_type", loss_type)
    for a, b in zip(one["history"], two["history"]):
        assert a["reward"] == b["reward"], "completions must not depend on the number of ranks"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path):
    ref = _run(tmp_path / "ref", 1, "--steps", "3")
    out = tmp_path / "run"
    _run(out, 2, "--steps", "2", "--save_steps", "2")
    assert (out / "checkpoint-2" / "model.safetensors").exists()
    resumed = _run(out, 1, "--steps", "3", "--resume")
    for k, v in ref["params"].items():
        torch.testing.assert_close(resumed["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
