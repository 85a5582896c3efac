"""PEFT/LoRA as TRL runs it (``peft_config=``): only the adapters train, the base weights stay as loaded, and with
beta > 0 the reference log-probs come from the same model with its adapters disabled (no second copy), through our
fused log-prob path. Runs tests/dist_worker.py in one process."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from grpo_fast.testing import tiny_causal_lm  # noqa: E402

_spec = importlib.util.spec_from_file_location("_dist_tests", Path(__file__).with_name("test_distributed.py"))
_dist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dist)
run_worker, assert_same_run = _dist.run_worker, _dist.assert_same_run


def _base_key(key: str) -> str:
    return key.removeprefix("base_model.model.").replace(".base_layer", "")


def test_lora_trains_only_adapters_against_the_adapter_off_reference(tmp_path):
    out = run_worker(tmp_path / "ours", 1, "--lora", "--steps", "3")
    assert not out["ref_model"], "LoRA's reference is the base with adapters off, not a second model"
    init = tiny_causal_lm(seed=4).state_dict()
    lora = {k: v for k, v in out["params"].items() if "lora_" in k}
    base = {_base_key(k): v for k, v in out["params"].items() if "lora_" not in k}
    assert base.keys() == init.keys()
    for k, v in init.items():
        assert torch.equal(base[k], v), f"base weight {k} changed"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora.items() if "lora_B" in k), "adapters moved"
    kl = [row["kl"] for row in out["history"] if "kl" in row]
    assert kl[0] == 0.0, "LoRA starts as the identity: policy == reference"
    assert all(k > 0 for k in kl[1:]), "the reference must stay the adapter-off base while the adapters move"


def test_lora_matches_trl(tmp_path):
    """TRL's generation (reseeded identically), our fused log-probs (policy and adapter-off reference), shared-
    prefix update and loss vs TRL's own trainer: same KL, loss and adapter weights."""
    ours = run_worker(tmp_path / "ours", 1, "--lora", "--reseed", "--no_sampler")
    trl = run_worker(tmp_path / "trl", 1, "--lora", "--reseed", "--trainer", "trl")
    assert_same_run(trl, ours)
    for x, y in zip(trl["history"], ours["history"]):
        if "kl" in x:
            assert y["kl"] == pytest.approx(x["kl"], rel=1e-4, abs=1e-8)
