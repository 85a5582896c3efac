"""PEFT/LoRA as TRL users run it: adapters train, the base stays frozen, the reference is the base (adapters off)."""

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from grpo_fast.config import GRPOConfig  # noqa: E402
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from grpo_fast.trainer import GRPOTrainer  # noqa: E402


def alternating(prompts, completions, **kw):
    return [float(i % 2) for i in range(len(completions))]


def _trainer(tmp_path, **kw):
    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=3, learning_rate=1e-2, max_steps=2, logging_steps=1, report_to=[],
                     beta=0.04, gradient_checkpointing=False, lr_scheduler_type="constant", **kw)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return GRPOTrainer(tiny_causal_lm(seed=3), [alternating], args=cfg, processing_class=tiny_tokenizer(),
                       train_dataset=[{"prompt": "3+4="}, {"prompt": "5+6="}], peft_config=lora)


def test_lora_trains_adapters_and_uses_base_as_reference(tmp_path):
    t = _trainer(tmp_path)
    assert t.ref_model is None, "no second copy of the weights"
    before = {k: v.clone() for k, v in t.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = t.train()
    changed = {k for k, v in t.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), changed
    assert history[0]["kl"] == 0.0  # LoRA starts as the identity: policy == reference
    assert history[1]["kl"] > 0.0  # after an update the adapters move the policy away from the base


def test_lora_checkpoint_resumes(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _trainer(tmp_path / "a", save_steps=0)
        full.max_steps = 3
        full.train()
        first = _trainer(tmp_path / "b", save_steps=2)
        first.train()
        assert (tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors").exists()
        second = _trainer(tmp_path / "b", save_steps=2)
        second.max_steps = 3
        second.train(resume_from_checkpoint=True)
    for (k, a), (_, b) in zip(full.model.named_parameters(), second.model.named_parameters()):
        torch.testing.assert_close(b, a, msg=k)
