"""Data parallel over prompts with torchrun on the gloo backend: 2 ranks == 1 rank on the same global batch, with
replicated weights (DDP semantics) and with FSDP2 full sharding (``fsdp="full_shard"``, which runs on CPU/gloo in
the pinned torch); checkpoints written by 2 ranks resume on 1 and load in Hugging Face."""

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


@pytest.mark.parametrize("flags", [[], ["--tie"], ["--gc", "--eval"]], ids=["untied", "tied", "checkpointing-eval"])
def test_fsdp_two_ranks_match_one_rank(tmp_path, flags):
    tie = "--tie" in flags
    one = _run(tmp_path / "one", 1, *flags)
    two = _run(tmp_path / "two", 2, "--fsdp", *flags)
    assert two["sharded"] and not one["sharded"], "the 2-rank run must hold DTensor (sharded) parameters"
    assert len(one["history"]) == len(two["history"]) >= 2
    for a, b in zip(one["history"], two["history"]):
        assert a.get("reward") == b.get("reward") and a.get("eval_reward") == b.get("eval_reward")
        assert a.keys() == b.keys()
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    if "--eval" in flags:
        assert any("eval_reward" in row for row in two["history"])
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    init = _initial_params(tie)
    moved = sum(not torch.equal(init[k], v) for k, v in one["params"].items() if k in init)
    assert moved > len(init) // 2, "the run must actually train"


def _initial_params(tie: bool) -> dict:
    from grpo_fast.testing import tiny_causal_lm

    return {k: v.detach().clone() for k, v in tiny_causal_lm(seed=4, tie=tie).state_dict().items()}


def test_fsdp_checkpoint_resumes_on_one_rank_and_loads_in_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = _run(tmp_path / "ref", 1, "--steps", "3")
    out = tmp_path / "run"
    at_two = _run(out, 2, "--fsdp", "--steps", "2", "--save_steps", "2")
    ckpt = out / "checkpoint-2"
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(hf).__name__ == "LlamaForCausalLM"
    for k, v in at_two["params"].items():
        torch.testing.assert_close(hf.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert hf.config.architectures == ["LlamaForCausalLM"]
    assert isinstance(next(iter(torch.load(ckpt / "optimizer.pt", weights_only=False)["state"])), str)
    resumed = _run(out, 1, "--steps", "3", "--resume")  # unsharded, one process
    for k, v in ref["params"].items():
        torch.testing.assert_close(resumed["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    again = tmp_path / "again"  # and a plain checkpoint resumes sharded
    _run(again, 1, "--steps", "2", "--save_steps", "2")
    resumed2 = _run(again, 2, "--fsdp", "--steps", "3", "--resume")
    for k, v in ref["params"].items():
        torch.testing.assert_close(resumed2["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
