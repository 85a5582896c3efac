"""FastGRPOTrainer (grpo_fast.GRPOTrainer's base) vs TRL's GRPOTrainer: the same loss and gradients on the same
batch, and proof our ops ran."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import grpo_fast.integrations.trl as dropin  # noqa: E402
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402

V, D = tiny_causal_lm().config.vocab_size, tiny_causal_lm().config.hidden_size


def reward(prompts, completions, **kw):
    return [float(len(c) % 2) for c in completions]


def _trainers(tmp_path, classes=(GRPOTrainer, dropin.FastGRPOTrainer), **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                num_generations=4, max_completion_length=5, bf16=False, gradient_checkpointing=False, seed=0,
                logging_steps=1)
    base.update(kw)
    data = Dataset.from_list([{"prompt": "3+4="}, {"prompt": "12+5="}])
    path = tmp_path / "model"  # TRL builds its reference model (beta > 0) from a path
    tiny_causal_lm(seed=2).save_pretrained(path)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in classes:
            t = cls(str(path), [reward], args=GRPOConfig(**base), train_dataset=data,
                    processing_class=tiny_tokenizer())
            t.current_gradient_accumulation_steps = 1
            t.model.train()
            out.append(t)
    return out


def _inputs(beta, off_policy, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n, P, L = 4, 6, 5
    prompt_ids = torch.randint(3, V, (n, P), generator=g)
    prompt_mask = torch.ones(n, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(3, V, (n, L), generator=g)
    completion_mask = torch.ones(n, L, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 1:] = 0
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.25, -0.75]),
        "num_items_in_batch": completion_mask.sum(),
    }
    if off_policy:
        inputs["old_per_token_logps"] = -torch.rand(n, L, generator=g) * 4
    if beta:
        inputs["ref_per_token_logps"] = -torch.rand(n, L, generator=g) * 4
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


class LogitRows(TorchDispatchMode):
    """Records the most rows of any logits-shaped tensor (float, last dim V) an op produced; the LM-head weight's
    transpose ``[D, V]`` is not logits."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == V \
                    and tuple(t.shape) != (D, V):
                self.rows = max(self.rows, t.numel() // V)
        return out


def test_logit_watch_sees_plain_logits():
    model = tiny_causal_lm()
    with LogitRows() as watch:
        model(torch.randint(3, V, (4, 5)))
    assert watch.rows >= 20


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


def _loss_and_grads(trainer, inputs):
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta, off_policy", [(0.0, False), (0.04, True)], ids=["on-policy", "kl-off-policy"])
def test_same_loss_and_gradients_as_trl(tmp_path, loss_type, beta, off_policy, monkeypatch, numerics):
    """Ours in fp32 against TRL in fp64 (the tiny model and the inputs cast), within twice the error of TRL's own
    code run in fp32 on this machine. Floors: the loss's scales with its condition Σ|∂loss/∂θ|·|θ|; a parameter
    gradient's with how far one fp32 ulp of every weight moves it (deep gradients are ill-conditioned sums)."""
    kw = dict(loss_type=loss_type, beta=beta)
    if loss_type == "cispo":
        kw["epsilon_high"] = 3.0
    trl64, trl32, fast = _trainers(tmp_path, (GRPOTrainer, GRPOTrainer, dropin.FastGRPOTrainer), **kw)
    trl64.model.double()
    inputs = _inputs(beta, off_policy)
    ref_loss, ref_grads = _loss_and_grads(trl64, _inputs(beta, off_policy, dtype=torch.float64))
    ref_grads = {k: v.clone() for k, v in ref_grads.items()}
    params = {k: p.detach().clone() for k, p in trl64.model.named_parameters()}
    scales = numerics.ulp_response_scales(
        trl64.model, lambda: _loss_and_grads(trl64, _inputs(beta, off_policy, dtype=torch.float64))[1], ref_grads)
    plain_loss, plain_grads = _loss_and_grads(trl32, inputs)

    calls = {"logprobs": 0, "loss": 0}
    real_lp, real_loss = dropin.linear_logprobs, dropin.grpo_loss

    def spy_lp(*a, **k):
        calls["logprobs"] += 1
        return real_lp(*a, **k)

    def spy_loss(*a, **k):
        calls["loss"] += 1
        return real_loss(*a, **k)

    monkeypatch.setattr(dropin, "linear_logprobs", spy_lp)
    monkeypatch.setattr(dropin, "grpo_loss", spy_loss)
    monkeypatch.setattr(dropin.FastGRPOTrainer, "logprob_chunk_size", 4)
    with LogitRows() as watch:
        fast_loss, fast_grads = _loss_and_grads(fast, inputs)

    assert calls == {"logprobs": 1, "loss": 1}, "our fused ops must have run"
    T = inputs["completion_ids"].numel()
    assert watch.rows <= 4 < T, f"a logits tensor of {watch.rows} rows was created (chunk 4, T = {T})"
    scale = numerics.condition_scale(*((g, params[name]) for name, g in ref_grads.items()))
    numerics.check_2x(fast_loss, ref_loss, plain_loss, name="loss", scale=scale)
    for name, g in ref_grads.items():
        assert (g is None) == (fast_grads[name] is None) == (plain_grads[name] is None), name
        if g is not None:
            numerics.check_2x(fast_grads[name], g, plain_grads[name], name=name, scale=scales[name])
    for key in ("entropy", "clip_ratio/region_mean", "kl", "cispo_clip_ratio"):
        if key in trl64._metrics["train"]:
            ref, plain, ours = (torch.tensor(t._metrics["train"][key][0], dtype=torch.float64)
                                for t in (trl64, trl32, fast))
            numerics.check_2x(ours, ref, plain, name=key, dtype=torch.float32)


@pytest.mark.parametrize("cls", ["FastGRPOTrainer", "grpo_fast.GRPOTrainer"])
def test_fast_trainer_trains_a_step(tmp_path, cls):
    import grpo_fast

    trainer_cls = dropin.FastGRPOTrainer if cls == "FastGRPOTrainer" else grpo_fast.GRPOTrainer
    (fast,) = _trainers(tmp_path, (trainer_cls,), max_steps=1, loss_type="dapo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast.train()
    assert fast.state.global_step == 1
    assert "entropy" in fast.state.log_history[0]
