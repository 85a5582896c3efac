"""FastGRPOTrainer vs TRL's GRPOTrainer: the same loss and gradients on the same batch, and proof our ops ran."""

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


def _trainers(tmp_path, **kw):
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
        for cls in (GRPOTrainer, dropin.FastGRPOTrainer):
            t = cls(str(path), [reward], args=GRPOConfig(**base), train_dataset=data,
                    processing_class=tiny_tokenizer())
            t.current_gradient_accumulation_steps = 1
            t.model.train()
            out.append(t)
    return out


def _inputs(beta, off_policy, seed=0):
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
    return inputs


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


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta, off_policy", [(0.0, False), (0.04, True)], ids=["on-policy", "kl-off-policy"])
def test_same_loss_and_gradients_as_trl(tmp_path, loss_type, beta, off_policy, monkeypatch):
    kw = dict(loss_type=loss_type, beta=beta)
    if loss_type == "cispo":
        kw["epsilon_high"] = 3.0
    trl_trainer, fast = _trainers(tmp_path, **kw)
    inputs = _inputs(beta, off_policy)

    trl_loss = trl_trainer._compute_loss(trl_trainer.model, inputs)
    trl_loss.backward()

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
        fast_loss = fast._compute_loss(fast.model, inputs)
        fast_loss.backward()

    assert calls == {"logprobs": 1, "loss": 1}, "our fused ops must have run"
    T = inputs["completion_ids"].numel()
    assert watch.rows <= 4 < T, f"a logits tensor of {watch.rows} rows was created (chunk 4, T = {T})"
    torch.testing.assert_close(fast_loss, trl_loss, rtol=2e-5, atol=1e-6)
    for (name, p_trl), (_, p_fast) in zip(trl_trainer.model.named_parameters(), fast.model.named_parameters()):
        assert (p_trl.grad is None) == (p_fast.grad is None), name
        if p_trl.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_trl.grad, rtol=1e-4, atol=1e-6, msg=name)
    for key in ("entropy", "clip_ratio/region_mean", "kl", "cispo_clip_ratio"):
        if key in trl_trainer._metrics["train"]:
            assert fast._metrics["train"][key] == pytest.approx(trl_trainer._metrics["train"][key], rel=1e-4, abs=1e-6)


def test_fast_trainer_trains_a_step(tmp_path):
    _, fast = _trainers(tmp_path, max_steps=1, loss_type="dapo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast.train()
    assert fast.state.global_step == 1
    assert "entropy" in fast.state.log_history[0]
