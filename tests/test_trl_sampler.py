"""FastGRPOTrainer's generation seam: TRL's ``_generate_single_turn`` served by the shared-prefix sampler."""

import logging
import warnings
from unittest.mock import patch

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationMixin, GptOssConfig, GptOssForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import grpo_fast.integrations.trl as dropin  # noqa: E402
from grpo_fast.integrations.trl import FastGRPOTrainer  # noqa: E402
from grpo_fast.integrations.trl_sampler import _runs, sampler_refusal  # noqa: E402
from grpo_fast.sampler import SharedPrefixSampler  # noqa: E402
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402


def reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _trainer(tmp_path, **kw):
    args = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                num_generations=2, max_completion_length=6, bf16=False, seed=0, logging_steps=1, max_steps=1)
    args.update(kw)
    data = Dataset.from_list([{"prompt": "3+4="}, {"prompt": "12+5="}, {"prompt": "7*6="}, {"prompt": "9-2="}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FastGRPOTrainer(tiny_causal_lm(seed=1), [reward], args=GRPOConfig(**args), train_dataset=data,
                               processing_class=tiny_tokenizer())


def test_runs_groups_consecutive_identical_prompts():
    assert _runs([[1, 2], [1, 2], [3], [3], [3], [1, 2]]) == [([1, 2], 2), ([3], 3), ([1, 2], 1)]


def test_training_generates_with_the_sampler_not_generate(tmp_path):
    trainer = _trainer(tmp_path)
    with (
        patch.object(SharedPrefixSampler, "generate", autospec=True, side_effect=SharedPrefixSampler.generate) as ours,
        patch.object(GenerationMixin, "generate", side_effect=AssertionError("transformers' generate was called")),
    ):
        trainer.train()
    assert ours.call_count == 1  # 4 completions = 2 prompts x 2 generations, in one sampler call
    assert ours.call_args.kwargs["group_size"] == 2 and len(ours.call_args.args[1]) == 2
    assert trainer.state.log_history[-1]["train_loss"] is not None


def test_sampler_logprobs_replace_the_old_logprob_pass(tmp_path):
    # num_iterations=2 reuses completions for 2 steps: TRL recomputes old log-probs; the sampler's must equal them.
    trainer = _trainer(tmp_path, num_iterations=2, temperature=0.7)
    trainer.model.train()
    assert trainer._old_logps_recomputed()
    rows = [{"prompt": p} for p in ("3+4=", "3+4=", "12+5=", "12+5=")]
    with patch.object(dropin, "linear_logprobs", wraps=dropin.linear_logprobs) as head:
        out = trainer._generate_and_score_completions(rows)
    assert head.call_count == 0  # no extra forward pass for the old log-probs (beta = 0: no reference pass either)
    old, sampled = out["old_per_token_logps"], out["sampling_per_token_logps"]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        recomputed, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                       out["completion_ids"].size(1))
    valid = out["completion_mask"].bool()
    assert valid.sum() > 4
    torch.testing.assert_close(old[valid], recomputed[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sampled[valid], old[valid])
    assert trainer._sampled_logps is None  # consumed by the old-log-prob pass, never reused


def test_on_policy_leaves_old_logprobs_to_trl(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.train()
    rows = [{"prompt": "3+4="}, {"prompt": "3+4="}, {"prompt": "12+5="}, {"prompt": "7*6="}]  # groups of 2, 1, 1
    with patch.object(SharedPrefixSampler, "generate", autospec=True, side_effect=SharedPrefixSampler.generate) as ours:
        out = trainer._generate_and_score_completions(rows)
    assert [call.kwargs["group_size"] for call in ours.call_args_list] == [2, 1, 1]
    assert out.get("old_per_token_logps") is None  # on-policy: ratio 1, as in TRL
    assert out["sampling_per_token_logps"].shape == out["completion_ids"].shape == (4, out["completion_ids"].size(1))


def test_unimplemented_generation_kwargs_fall_back_to_trl_by_name(tmp_path, caplog):
    trainer = _trainer(tmp_path, generation_kwargs={"num_beams": 2, "length_penalty": -0.1})
    trainer.model.train()
    with (
        caplog.at_level(logging.WARNING, logger="grpo_fast.integrations.trl_sampler"),
        patch.object(SharedPrefixSampler, "generate", side_effect=AssertionError("sampler was called")),
    ):
        out = trainer._generate_and_score_completions([{"prompt": "3+4="}, {"prompt": "3+4="}])
    assert out["completion_ids"].size(0) == 2
    assert "length_penalty" in caplog.text and "num_beams" in caplog.text


def test_flag_off_uses_trl_generation(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.use_shared_prefix_sampler = False
    trainer.model.train()
    with patch.object(SharedPrefixSampler, "generate", side_effect=AssertionError("sampler was called")):
        out = trainer._generate_and_score_completions([{"prompt": "3+4="}, {"prompt": "3+4="}])
    assert "sampling_per_token_logps" not in out


def test_refusals_name_what_the_sampler_cannot_serve():
    small = dict(vocab_size=64, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                 intermediate_size=16, head_dim=4)
    assert sampler_refusal(tiny_causal_lm(), 10, 20) is None
    gemma = Gemma2ForCausalLM(Gemma2Config(**small))
    assert "soft-capping" in sampler_refusal(gemma, 10, 20)
    oss = GptOssForCausalLM(GptOssConfig(**small, num_local_experts=2, num_experts_per_tok=1))
    assert "sinks" in sampler_refusal(oss, 10, 20)
    gemma_window = Gemma2ForCausalLM(Gemma2Config(**small, sliding_window=16, attn_logit_softcapping=None))
    assert "sliding window of 16" in sampler_refusal(gemma_window, 10, 20)
    assert sampler_refusal(gemma_window, 4, 8) is None
