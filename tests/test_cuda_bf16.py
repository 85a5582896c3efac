"""bf16 mixed precision in GRPOTrainer: TRL's (accelerate's) bf16 autocast over every model forward — the
shared-prefix sampler's prefill and decode, the fused log-prob forward, the loss — with fp32 master weights.

On CUDA with ``bf16=True``; on the CPU through ``use_cpu=True, bf16=True`` (accelerate's CPU bf16 autocast), which
exercises the same code paths on any machine. Tolerances follow the 2x rule: our bf16 log-probs differ from fp32 by
at most twice what TRL's own bf16 path does on the same batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import trl
from datasets import Dataset

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.testing import cpu_bf16_attention_error, tiny_causal_lm, tiny_tokenizer

ROWS = Dataset.from_list([{"prompt": "3+4="}, {"prompt": "12+30="}])
DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
           pytest.param("cpu", marks=pytest.mark.skipif(cpu_bf16_attention_error() is not None,
                                                        reason=f"torch CPU bf16 SDPA: {cpu_bf16_attention_error()}"))]


def alternating(prompts, completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


def _trainer(tmp_path, device: str, bf16: bool, cls=GRPOTrainer, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                max_completion_length=6, learning_rate=1e-3, max_steps=1, logging_steps=1, save_strategy="no",
                report_to="none", seed=0, gradient_checkpointing=False, loss_type="dapo", bf16=bf16,
                use_cpu=device == "cpu", disable_tqdm=True)
    base.update(kw)
    config = (GRPOConfig if cls is GRPOTrainer else trl.GRPOConfig)(**base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(tiny_causal_lm(seed=1, init_std=0.1, hidden_size=128), [alternating], args=config,
                   train_dataset=ROWS, processing_class=tiny_tokenizer())


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_runs_in_bf16_with_fp32_master_weights(device, tmp_path):
    """Every projection of generation and of the update runs in bf16; parameters and AdamW states stay fp32."""
    t = _trainer(tmp_path, device, True)
    dtypes = []
    proj = t.model.model.layers[0].self_attn.q_proj
    handle = proj.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.train()
    finally:
        handle.remove()
    assert len(dtypes) > 2 and set(dtypes) == {torch.bfloat16}  # prefill, decode steps, the log-prob forward
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    states = t.optimizer.state.values()
    assert states and all(v.dtype == torch.float32 for s in states for v in s.values() if v.dim() > 0)
    assert torch.isfinite(torch.tensor(t.state.log_history[0]["loss"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp32_head", [False, True], ids=["bf16_head", "fp32_head"])
def test_bf16_head_precision_follows_trl(device, fp32_head, tmp_path, monkeypatch):
    """The fused head runs where TRL's fused head runs: inside the bf16 autocast (bf16 GEMMs), or outside it on fp32
    hidden states with ``cast_lm_head_to_fp32``."""
    import grpo_fast.integrations.trl as seam

    calls, real = [], seam.linear_logprobs

    def spy(hidden, weight, *args, **kwargs):
        calls.append((torch.is_autocast_enabled(hidden.device.type), hidden.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(seam, "linear_logprobs", spy)
    t = _trainer(tmp_path, device, True, cast_lm_head_to_fp32=fp32_head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train()
    assert calls
    assert all(on is not fp32_head for on, _ in calls)
    if fp32_head:
        assert all(dtype == torch.float32 for _, dtype in calls)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logprobs_match_trl(device, tmp_path):
    """Our fused, shared-prefix log-probs under bf16 autocast vs TRL's fp32 ones: within twice TRL's own bf16 gap."""
    ours16, trl16, trl32 = (_trainer(tmp_path / n, device, bf16, cls) for n, bf16, cls in
                            (("a", True, GRPOTrainer), ("b", True, trl.GRPOTrainer), ("c", False, trl.GRPOTrainer)))
    g = torch.Generator().manual_seed(0)
    n, P, L = 8, 5, 6
    prompts = torch.randint(3, 50, (2, P), generator=g).repeat_interleave(4, 0)  # two groups of four
    ids = torch.cat([prompts, torch.randint(3, 50, (n, L), generator=g)], 1).to(device)
    mask = torch.ones_like(ids)
    mask[1, P + 3 :] = 0
    out = {}
    for name, t in (("ours16", ours16), ("trl16", trl16), ("trl32", trl32)):
        t.model.eval()
        with torch.no_grad():
            logp, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, L)
        out[name] = logp.float().cpu() * mask[:, P:].cpu()
    gap_ours = (out["ours16"] - out["trl32"]).abs().max().item()
    gap_trl = (out["trl16"] - out["trl32"]).abs().max().item()
    assert gap_trl > 0, "TRL's bf16 path should differ from fp32: autocast did not run"
    assert gap_ours <= 2 * gap_trl + 1e-3, (gap_ours, gap_trl)


def _head_case(T: int, D: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / D**0.5)  # logits of order ±3
    t = torch.randint(0, V, (T,), generator=g)
    t[[0, T - 1]] = -100
    return h, w, t, torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)


def _head_run(fn, case, device, hidden_dtype, weight_dtype, autocast, **kw):
    h, w, t, g_logp, g_ent = case
    hh = h.detach().to(device, hidden_dtype).requires_grad_()
    ww = w.detach().to(device, weight_dtype).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        logp, ent = fn(hh, ww, t.to(device), temperature=0.7, return_entropy=True, **kw)
    ((logp.double() * g_logp.to(device)).sum() + (ent.double() * g_ent.to(device)).sum()).backward()
    return {k: v.detach().cpu() for k, v in {"logp": logp, "entropy": ent, "d_hidden": hh.grad,
                                             "d_weight": ww.grad}.items()}  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("hidden_dtype", "weight_dtype", "autocast", "softcap"),
    [(torch.float32, torch.float32, False, 30.0), (torch.bfloat16, torch.bfloat16, False, 2.0),
     (torch.float32, torch.float32, True, None), (torch.bfloat16, torch.float32, True, 2.0)],
    ids=["fp32-cap30", "bf16-cap2", "autocast-fp32-inputs", "autocast-bf16-hidden-fp32-weight-cap2"],
)
def test_fused_head_compiled(hidden_dtype, weight_dtype, autocast, softcap, assert_close_2x):
    """The compiled kernels with a soft-cap and under autocast (Gemma-2's head: V = 256000 is cut to 32003 here)."""
    from grpo_fast.kernels.logprob import linear_logprobs, linear_logprobs_ref

    case = _head_case(300, 256, 32003)
    ours = _head_run(linear_logprobs, case, "cuda", hidden_dtype, weight_dtype, autocast, softcap=softcap)
    plain = _head_run(linear_logprobs_ref, case, "cuda", hidden_dtype, weight_dtype, autocast, softcap=softcap)
    ref64 = _head_run(linear_logprobs_ref, case, "cpu", torch.float64, torch.float64, False, softcap=softcap)
    low = autocast or hidden_dtype == torch.bfloat16
    for name in ref64:
        assert_close_2x(ours[name], ref64[name], plain[name], atol=1e-3 if low else 1e-5, name=name)
