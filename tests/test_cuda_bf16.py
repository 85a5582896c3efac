"""bf16 mixed precision in the trainer: autocast over every model forward, fp32 master weights.

On CUDA the tests use the trainer's own autocast (``bf16=True``). On the CPU the trainer deliberately stays fp32, so
the same tests run with the trainer's autocast switched to CPU bf16 autocast: that exercises every code path under
autocast (sampler decode, shared-prefix training forward, fused LM head, loss) on any machine. Tolerances follow the
2x rule against plain PyTorch: the gap between our bf16 and fp32 results is at most twice the gap the model's own
logits path (``model(...).logits`` → log_softmax) shows between bf16 autocast and fp32 on the same batch.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from grpo_fast.config import GRPOConfig
from grpo_fast.forward import completion_logprobs, padded_inputs
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from grpo_fast.trainer import GRPOTrainer

ROWS = [{"prompt": "3+4="}, {"prompt": "12+30="}]
DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")), "cpu"]


def alternating(prompts, completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


def _trainer(tmp_path, device: str, bf16: bool, monkeypatch=None, **kw) -> GRPOTrainer:
    base = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 6, "learning_rate": 1e-3, "max_steps": 2, "logging_steps": 1, "save_steps": 0,
            "report_to": [], "seed": 0, "gradient_checkpointing": False, "warmup_steps": 0, "loss_type": "dapo",
            "bf16": bf16}
    base.update(kw)
    if device == "cpu" and bf16 and monkeypatch is not None:  # the CPU stand-in for CUDA autocast
        monkeypatch.setattr(GRPOTrainer, "_autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    model = tiny_causal_lm(seed=1, init_std=0.1, hidden_size=128).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model, [alternating], args=GRPOConfig(**base), train_dataset=ROWS,
                           processing_class=tiny_tokenizer())


def _plain_logprobs(model, batch, pad_id: int, temperature: float) -> torch.Tensor:
    """The model's own head: full [N, L, V] logits, log_softmax(logits / T), gathered — what TRL computes."""
    ids, mask, pos, P = padded_inputs(batch, pad_id)
    L = batch.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : P - 1 + L]  # [N, L, V]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask  # [N, L]


def _step(t: GRPOTrainer, rollout, autocast: bool, plain: bool):
    """One minibatch's loss, its per-token log-probs and every gradient, with or without the trainer's autocast."""
    t.model.zero_grad(set_to_none=True)
    with t._autocast() if autocast else contextlib.nullcontext():
        if plain:  # dapo on-policy: -Σ A·logp / (token count), the trainer's loss up to its exact value
            mask = rollout.batch.completion_mask
            logp = _plain_logprobs(t.model, rollout.batch, t.pad_id, t.args.temperature)
            loss = -(rollout.advantages[:, None] * logp * mask).sum() / mask.sum()
        else:
            loss, _ = t._minibatch_loss(rollout, 0, first=True)
            logp, _ = completion_logprobs(t.model, rollout.batch, t.pad_id, t.args.temperature, False)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None])
    return loss.detach(), logp.detach(), grads


def _gaps(t, rollout, plain):
    loss16, logp16, g16 = _step(t, rollout, True, plain)
    loss32, logp32, g32 = _step(t, rollout, False, plain)
    assert g16.dtype == torch.float32  # fp32 master weights get fp32 gradients
    grad_gap = ((g16 - g32).norm() / g32.norm()).item()
    return (loss16 - loss32).abs().item(), (logp16 - logp32).abs().max().item(), grad_gap


def test_bf16_on_cpu_trains_in_fp32(tmp_path):
    """The CPU path is unchanged: bf16=True warns once and trains bit-for-bit as bf16=False."""
    with pytest.warns(UserWarning, match=r"bf16=True has no effect on cpu"):
        GRPOTrainer(tiny_causal_lm(), [alternating], args=GRPOConfig(output_dir=str(tmp_path), report_to=[]),
                    train_dataset=ROWS, processing_class=tiny_tokenizer())
    runs = []
    for bf16 in (True, False):
        t = _trainer(tmp_path / str(bf16), "cpu", bf16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = t.train()
        runs.append(([row.get("loss") for row in history], [p.detach().clone() for p in t.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_matches_fp32(device, tmp_path, monkeypatch):
    """One step under bf16 autocast vs fp32 on the same rollout: log-probs, loss and gradients within twice the
    bf16-vs-fp32 gap of plain PyTorch; parameters, gradients and AdamW states stay fp32 after the optimizer step."""
    t = _trainer(tmp_path, device, True, monkeypatch)
    rollout, _ = t._rollout()
    assert rollout.advantages.abs().sum() > 0
    ours = _gaps(t, rollout, plain=False)
    plain = _gaps(t, rollout, plain=True)
    for name, err, base, atol in zip(("loss", "logp", "grad"), ours, plain, (1e-3, 1e-3, 1e-3)):
        assert err <= 2 * base + atol, f"{name}: bf16 gap {err:.3e} > 2 x plain bf16 gap {base:.3e} + {atol}"
    assert ours[2] > 0  # autocast did change the numerics: the check above is not fp32 against itself
    _step(t, rollout, True, plain=False)
    t._optimizer_step()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for v in s.values() if v.dim() > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_decodes_in_bf16(device, tmp_path, monkeypatch):
    """The sampler's tokens come from the bf16 forward: every projection of prefill and decode runs in bf16, and
    its log-probs are closer to the bf16 training forward's than the fp32 forward's are (the logged gap)."""
    t = _trainer(tmp_path, device, True, monkeypatch)
    dtypes = []
    proj = t.model.model.layers[0].self_attn.q_proj
    handle = proj.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    try:
        t._sample(ROWS)
    finally:
        handle.remove()
    assert len(dtypes) > 1 and set(dtypes) == {torch.bfloat16}  # prefill and every decode step
    rollout, _ = t._rollout()
    with torch.no_grad():
        with t._autocast():
            bf16, _ = completion_logprobs(t.model, rollout.batch, t.pad_id, t.args.temperature, False)
        fp32, _ = completion_logprobs(t.model, rollout.batch, t.pad_id, t.args.temperature, False)
    mask = rollout.batch.completion_mask.bool()
    gap_bf16 = (rollout.sampling_logp - bf16)[mask].abs().mean()
    gap_fp32 = (rollout.sampling_logp - fp32)[mask].abs().mean()
    assert gap_bf16 < gap_fp32, (gap_bf16, gap_fp32)
    _, metrics = t._minibatch_loss(rollout, 0, first=True)
    assert "sampling/sampling_logp_difference/max" in metrics


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
