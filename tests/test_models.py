"""Heads that transform logits: a tiny random-init Gemma-2 (final-logit soft-cap) through our fused log-prob path,
the trainer's and the TRL drop-in's, against the model's own ``log_softmax(model(...).logits / T)``."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from grpo_fast.forward import PolicyBatch, completion_logprobs, padded_inputs
from grpo_fast.kernels.logprob import linear_logprobs
from grpo_fast.models import lm_head_of

TEMPERATURE = 0.7


def _gemma2(softcap: float | None):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=softcap, attn_logit_softcapping=None, initializer_range=0.2,
                          pad_token_id=0, eos_token_id=1, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).float().eval()


def _batch() -> PolicyBatch:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 301, (4, 6), generator=gen)  # [N, L]
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a completion that ended early: its padding is ignored
    # equal-length prompts: a left-padded prompt row is fully masked, and fp64 SDPA turns such rows into NaN
    return PolicyBatch([[5, 6, 7, 8], [9, 10, 11, 12]], ids.masked_fill(mask == 0, 0), mask, 2)


def _model_logprobs(model, batch: PolicyBatch) -> torch.Tensor:
    """The model's own head (soft-cap included), then TRL's division by the temperature: [N, L]."""
    ids, attention_mask, positions, P = padded_inputs(batch, 0)
    L = batch.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + L] / TEMPERATURE, -1)  # [N, L, V]
    return logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "padded"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_gemma2_softcap_logprobs_match_the_model(backend, shared_prefix, force_backend, assert_close_2x):
    """Per-token log-probs through ``completion_logprobs`` equal the model's own (fp64 oracle: the same model in
    float64), within twice the error of the model's fp32 logits path; without the cap they would not."""
    force_backend(backend)
    model, batch = _gemma2(2.0), _batch()
    head = lm_head_of(model)
    assert head.softcap == 2.0 and head.scale == 1.0
    with torch.no_grad():
        ours, _ = completion_logprobs(model, batch, 0, TEMPERATURE, True, shared_prefix)
    plain = _model_logprobs(model, batch)
    ref64 = _model_logprobs(model.double(), batch)
    assert_close_2x(ours, ref64, plain, atol=1e-5, name="logp")
    # the cap matters here: the same hidden states through an uncapped head miss by far more than the tolerance
    hidden = model.float().get_decoder()(*padded_inputs(batch, 0)[:1]).last_hidden_state[:, 3:9].reshape(-1, 64)
    uncapped = linear_logprobs(hidden.detach(), head.weight.detach(), batch.completion_ids.reshape(-1),
                               temperature=TEMPERATURE)  # fmt: skip
    assert (uncapped.view(4, 6) - ref64)[batch.completion_mask.bool()].abs().max() > 0.1


def test_trl_dropin_passes_the_softcap():
    """``FastGRPOTrainer._get_per_token_logps_and_entropies`` (called unbound on a stand-in trainer) gives the
    model's own soft-capped log-probs, on TRL's inputs (no position_ids)."""
    pytest.importorskip("trl")
    from grpo_fast.integrations.trl import FastGRPOTrainer

    model, batch = _gemma2(2.0), _batch()
    ids, attention_mask, _, P = padded_inputs(batch, 0)
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m, autocast=contextlib.nullcontext)
    trainer = object.__new__(FastGRPOTrainer)  # the real methods, without TRL's set-up
    trainer.accelerator, trainer.temperature, trainer.num_generations = accelerator, TEMPERATURE, 2
    trainer.args = types.SimpleNamespace(cast_lm_head_to_fp32=False)
    with torch.no_grad():
        ours, _, _ = FastGRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, attention_mask, 6)
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, P - 1 : -1]  # [N, L, V]
    expected = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(ours[mask], expected[mask], atol=2e-5, rtol=0)


def test_lm_head_of_reads_the_head_transforms():
    assert lm_head_of(_gemma2(None)).softcap is None
    model = _gemma2(30.0)
    assert lm_head_of(model).softcap == 30.0
    model.config.logit_scale = 2.0  # a scale and a cap together: the order is undefined, so refused
    with pytest.raises(ValueError, match=r"both scales \(by 2.0\) and soft-caps \(final_logit_softcapping=30.0\)"):
        lm_head_of(model)
