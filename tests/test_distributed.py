"""GRPOTrainer across processes, as TRL runs it: ``torch.distributed.run`` with 2 ranks on the CPU (accelerate's
MULTI_CPU, gloo, DDP), and checkpoint resume through transformers' ``train(resume_from_checkpoint=...)``.

Why the seeding in these tests (tests/dist_worker.py has the switches):
- 2 ranks x b vs 1 rank x 2b: TRL splits each global batch of whole groups over the ranks (the same prompts in
  total), gathers rewards before the group normalization and DDP averages the gradients, so the update is the same
  *if the completions are*. GRPOTrainer's sampling seeds are keyed by the prompt's index in the global batch, so
  they do not change with the world size, and the comparison is exact up to float rounding. TRL's own generate
  draws from a per-rank global RNG (``set_seed(seed, device_specific=True)``), so for TRL's generation path we
  compare our trainer with TRL's trainer on 2 ranks, generation reseeded identically in both (``--reseed``).
- FSDP: accelerate 1.15 selects FSDP only for GPU-like distributed types (``AcceleratorState``), so on
  MULTI_CPU ``fsdp="full_shard"`` trains as DDP; that test runs the comparison and then skips, saying so. The
  log-prob path is checked under FSDP2 directly instead (``fully_shard``, tests/fsdp_worker.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

WORKER = str(Path(__file__).with_name("dist_worker.py"))


def run_worker(out: Path, ranks: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    if ranks == 1:
        cmd = [sys.executable, WORKER, str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(29500 + os.getpid() % 1000), WORKER, str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


def _steps(result: dict) -> list[dict]:
    return [row for row in result["history"] if "loss" in row]


def assert_same_run(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    """Same rewards every step (same completions), same loss, same final parameters, all finite."""
    rows_a, rows_b = _steps(a), _steps(b)
    assert len(rows_a) == len(rows_b) >= 2
    for x, y in zip(rows_a, rows_b):
        assert x["reward"] == y["reward"], "the runs sampled different completions"
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)
    for k, v in a["params"].items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(b["params"][k], v, rtol=rtol, atol=atol, msg=k)


def assert_trained(result: dict):
    from grpo_fast.testing import tiny_causal_lm

    init = tiny_causal_lm(seed=4).state_dict()
    moved = sum(not torch.equal(init[k], v) for k, v in result["params"].items())
    assert moved > len(init) // 2, "the run must actually train"


@pytest.mark.parametrize("flags", [[], ["--loss_type", "grpo", "--no_update"]],
                         ids=["dapo-shared-prefix", "grpo-padded"])
def test_two_ranks_match_one_rank(tmp_path, flags):
    one = run_worker(tmp_path / "one", 1, *flags)
    two = run_worker(tmp_path / "two", 2, *flags)
    assert two["drift"] == 0.0, "DDP replicas drifted apart: gradients were not all-reduced"
    assert_same_run(one, two)
    assert_trained(one)


def test_two_ranks_match_trl_on_two_ranks(tmp_path):
    """TRL's generation (global RNG per rank), our fused log-probs, shared-prefix update and loss vs TRL's."""
    ours = run_worker(tmp_path / "ours", 2, "--reseed", "--no_sampler")
    trl = run_worker(tmp_path / "trl", 2, "--reseed", "--trainer", "trl")
    assert ours["drift"] == trl["drift"] == 0.0
    assert_same_run(trl, ours)
    assert_trained(ours)


def test_fsdp_two_ranks_match_one_rank(tmp_path):
    one = run_worker(tmp_path / "one", 1)
    two = run_worker(tmp_path / "two", 2, "--fsdp")
    assert_same_run(one, two)
    if not two["sharded"]:
        pytest.skip("accelerate runs MULTI_CPU without FSDP (fsdp='full_shard' trained as DDP): FSDP needs GPUs")


def test_fsdp2_fused_logprobs_match_unsharded(tmp_path):
    """The log-prob path under FSDP2 itself (fully_shard per layer and the root, 2 gloo ranks; tests/fsdp_worker.py):
    each rank's log-probs and the averaged gradients equal the unsharded model's. A head weight read outside the
    root's forward (still a shard) or a decoder called past the root's hooks fails here."""
    out = tmp_path / "fsdp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(30500 + os.getpid() % 1000), str(Path(__file__).with_name("fsdp_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["sharded"] and result["grad_norm"] > 0
    assert result["logp_err"] <= 1e-5 and result["grad_err"] <= 1e-5, result


def test_resume_is_bit_exact(tmp_path):
    """4 steps straight == 2 steps, checkpoint, resume to 4: counter-based sampling seeds, TRL's data skip and
    transformers' RNG/optimizer restore give the same bits (the resume point is inside the first epoch)."""
    straight = run_worker(tmp_path / "straight", 1, "--steps", "4", "--prompts", "16")
    run_worker(tmp_path / "split", 1, "--steps", "2", "--save_steps", "2", "--prompts", "16")
    assert (tmp_path / "split" / "checkpoint-2" / "model.safetensors").exists()
    resumed = run_worker(tmp_path / "split", 1, "--steps", "4", "--resume", "--prompts", "16")
    assert_same_run(straight, resumed, rtol=0, atol=0)


@pytest.mark.xfail(strict=True, reason="TRL 1.16's RepeatSampler has no set_epoch: its generator restarts on "
                   "resume, so the epochs after the resume point see the first epoch's prompt order")
def test_resume_across_an_epoch_boundary_is_bit_exact(tmp_path):
    straight = run_worker(tmp_path / "straight", 1, "--steps", "4", "--prompts", "8")
    run_worker(tmp_path / "split", 1, "--steps", "2", "--save_steps", "2", "--prompts", "8")
    resumed = run_worker(tmp_path / "split", 1, "--steps", "4", "--resume", "--prompts", "8")
    assert_same_run(straight, resumed, rtol=0, atol=0)
