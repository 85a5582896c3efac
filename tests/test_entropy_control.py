"""Adaptive entropy control (TRL 1.16's ``use_adaptive_entropy``): the controller's known answers, the bonus and the
controller against TRL's own ``_compute_loss`` side by side, the coefficient across a checkpoint resume, and each of
the five config fields changing what the trainer does."""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict

import pytest
import torch
from grpo_fast.kernels.grpo_loss import LossOptions, grpo_loss, high_entropy_mask

from grpo_fast.config import GRPOConfig
from grpo_fast.entropy_control import EntropyControl
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer
from grpo_fast.trainer import GRPOTrainer

N, L, P = 6, 9, 3


def _window(control: EntropyControl, entropies: list[float], counts: list[int]) -> None:
    """One accumulation window: a minibatch per (entropy, token count), then the optimizer-step boundary."""
    for h, n in zip(entropies, counts):
        control.bonus(torch.full((1, n), h, dtype=torch.float64), torch.ones(1, n), len(counts))
    control.step()


def test_controller_known_answer():
    # binary-exact steps: up by delta while the window's entropy <= target (equality included), down otherwise,
    # clamped to [min, max]; the coefficient is applied only after a window at or below the target
    c = EntropyControl(coef=0.25, adaptive=True, target=1.0, delta=0.25, coef_min=0.0, coef_max=0.75)
    assert c.enabled and c.last_world_entropy == math.inf and c.applied() == 0.0  # the first window: no bonus
    seen = []
    for h in [0.5, 1.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0]:
        _window(c, [h], [3])
        seen.append((c.coef, c.applied()))
    assert seen == [(0.5, 0.5), (0.75, 0.75), (0.75, 0.75), (0.75, 0.75), (0.5, 0.0), (0.25, 0.0), (0.0, 0.0),
                    (0.0, 0.0), (0.25, 0.25)]


def test_controller_window_is_token_weighted():
    """1 token at 3.0 and 3 tokens at 0.0: the window's entropy is 0.75 <= 1 (the mean of minibatch means, 1.5,
    would step the other way)."""
    c = EntropyControl(coef=0.25, adaptive=True, target=1.0, delta=0.25)
    _window(c, [3.0, 0.0], [1, 3])
    assert c.last_world_entropy == 0.75 and c.coef == 0.5 and c.window is None


def test_static_control_never_moves():
    c = EntropyControl(coef=0.125)
    _window(c, [0.0], [2])
    assert c.enabled and c.applied() == 0.125 and c.coef == 0.125 and c.last_world_entropy == math.inf
    assert not EntropyControl(coef=0.0).enabled


def _trl_stand_in(logp, entropy, cfg, state):
    """The attributes TRL's ``_compute_loss`` reads, on one process (see tests/test_trl_parity_loss.py)."""
    from trl import GRPOTrainer as TRLTrainer

    accelerator = types.SimpleNamespace(
        num_processes=1, gather=lambda t: t, reduce=lambda t, reduction="sum": t, gather_for_metrics=lambda t: t,
        pad_across_processes=lambda t, dim=0, pad_index=0: t, sync_gradients=state["sync"],
    )
    args = types.SimpleNamespace(
        use_bias_correction_kl=False, delta=None, steps_per_generation=cfg["ga"], entropy_target=cfg["target"],
        entropy_coef_delta=cfg["delta"], entropy_coef_min=cfg["min"], entropy_coef_max=cfg["max"],
    )
    trainer = types.SimpleNamespace(
        args=args, accelerator=accelerator, model=types.SimpleNamespace(training=True), _metrics=state["metrics"],
        loss_type=cfg["loss_type"], importance_sampling_level="token", beta=0.0, epsilon_low=0.2, epsilon_high=0.28,
        top_entropy_quantile=cfg["rho"], off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, max_completion_length=L,
        current_gradient_accumulation_steps=cfg["ga"], _entropy_bonus_enabled=True, entropy_coef=state["coef"],
        use_adaptive_entropy=cfg["adaptive"], _last_world_entropy=state["last"], _entropy_window_stats=state["window"],
    )
    trainer.get_high_entropy_mask = types.MethodType(TRLTrainer.get_high_entropy_mask, trainer)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    return trainer


def _minibatch(seed):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.25
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ent = torch.rand(N, L, generator=g, dtype=torch.float64) * (0.3 if seed // 10 % 2 == 0 else 1.2)  # around 0.3
    return lp, old, adv, mask, ent


CASES = [
    dict(loss_type="dapo", adaptive=False, rho=1.0, ga=1),
    dict(loss_type="grpo", adaptive=False, rho=0.5, ga=2),
    dict(loss_type="dapo", adaptive=True, rho=1.0, ga=2),
    dict(loss_type="bnpo", adaptive=True, rho=0.5, ga=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_bonus_and_controller_match_trl_fp64(case):
    """Four optimizer steps of ``ga`` minibatches, ours and TRL's ``_compute_loss`` on the same fp64 inputs: the
    loss, the gradients of log-probs and entropies, policy_loss, and the coefficient after every step."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer as TRLTrainer

    cfg = dict(case, target=0.3, delta=0.05, min=0.02, max=0.12)
    ours = EntropyControl(0.1, cfg["adaptive"], cfg["target"], cfg["delta"], cfg["min"], cfg["max"])
    theirs = dict(coef=0.1, last=math.inf, window=None, metrics={"train": defaultdict(list)})
    options = LossOptions(loss_type=cfg["loss_type"], epsilon=0.2, epsilon_high=0.28, max_completion_length=L)
    applied = []
    for step in range(4):
        for k in range(cfg["ga"]):
            lp, old, adv, mask, ent = _minibatch(10 * step + k)
            nib = torch.tensor(float(mask.sum() * cfg["ga"]), dtype=torch.float64)
            x, e = lp.clone().requires_grad_(), ent.clone().requires_grad_()
            emask = high_entropy_mask(ent, mask, cfg["rho"]) if cfg["rho"] < 1.0 else None
            loss, _ = grpo_loss(x, old, None, adv, mask, options, num_items_in_batch=nib, entropy=ent,
                                entropy_mask=emask, gradient_accumulation_steps=cfg["ga"],
                                steps_per_generation=cfg["ga"])
            unscaled = cfg["loss_type"] not in ("dapo", "cispo", "vespo")
            policy_loss = loss.detach() * (cfg["ga"] if unscaled else 1)
            m = mask if emask is None else mask * emask
            applied.append(ours.applied())
            loss = loss - ours.applied() * ours.bonus(e, m, cfg["ga"])
            loss.backward()

            theirs["sync"] = k == cfg["ga"] - 1
            tx, te = lp.clone().requires_grad_(), ent.clone().requires_grad_()
            trainer = _trl_stand_in(tx, te, cfg, theirs)
            inputs = {
                "prompt_ids": torch.ones(N, P, dtype=torch.long), "prompt_mask": torch.ones(N, P, dtype=torch.long),
                "completion_ids": torch.ones(N, L, dtype=torch.long), "completion_mask": mask, "advantages": adv,
                "old_per_token_logps": old, "num_items_in_batch": nib,
            }
            t_loss = TRLTrainer._compute_loss(trainer, None, inputs)
            t_loss.backward()
            theirs.update(coef=trainer.entropy_coef, last=trainer._last_world_entropy,
                          window=trainer._entropy_window_stats)
            what = f"{cfg} step {step} minibatch {k}"
            torch.testing.assert_close(loss.detach(), t_loss.detach(), rtol=1e-12, atol=1e-14, msg=what)
            torch.testing.assert_close(x.grad, tx.grad, rtol=1e-12, atol=1e-14, msg=what)
            torch.testing.assert_close(e.grad, te.grad, rtol=1e-12, atol=1e-14, msg=what)
            assert policy_loss.item() == pytest.approx(theirs["metrics"]["train"]["policy_loss"][-1], rel=1e-12)
        ours.step()
        assert ours.coef == theirs["coef"] and ours.last_world_entropy == pytest.approx(theirs["last"], rel=1e-12)
        assert ours.coef == theirs["metrics"]["train"]["entropy_coef"][-1]
    assert (len(set(applied)) > 1) == cfg["adaptive"], applied  # the adaptive cases do move the coefficient


def reward_digit(prompts, completions, **kwargs):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def _trainer(out, model=None, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=3,
        learning_rate=3e-3, max_steps=3, logging_steps=1, save_steps=0, report_to=[], seed=3, warmup_steps=0,
        lr_scheduler_type="constant", gradient_checkpointing=False, use_adaptive_entropy=True, entropy_coef=0.1,
        entropy_coef_min=0.0, entropy_coef_max=1.0, entropy_coef_delta=0.05, entropy_target=10.0,
    )
    base.update(kw)
    return GRPOTrainer(model if model is not None else tiny_causal_lm(seed=1), [reward_digit],
                       args=GRPOConfig(**base), train_dataset=[{"prompt": "3+4="}, {"prompt": "2+5="}],
                       processing_class=tiny_tokenizer())


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_logs_coefficient_and_policy_loss(tmp_path):
    rows = _trainer(tmp_path / "a").train()
    assert [r["entropy_coef"] for r in rows] == pytest.approx([0.15, 0.2, 0.25])
    assert all("policy_loss" in r for r in rows)
    plain = _trainer(tmp_path / "b", use_adaptive_entropy=False, entropy_coef=0.0).train()
    assert not {"entropy_coef", "policy_loss"} & set(plain[-1])


def test_resume_restores_coefficient_bit_exact(tmp_path):
    full = _trainer(tmp_path / "a", max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    full.train()
    first = _trainer(tmp_path / "b", max_steps=2, save_steps=2, gradient_accumulation_steps=2,
                     per_device_train_batch_size=4)
    first.train()
    state = json.loads((tmp_path / "b" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["entropy_coef"] == first.entropy_control.coef != 0.1
    second = _trainer(tmp_path / "b", model=tiny_causal_lm(seed=99), max_steps=4, save_steps=2,
                      gradient_accumulation_steps=2, per_device_train_batch_size=4)
    second.train(resume_from_checkpoint=True)
    assert second.entropy_control.state() == full.entropy_control.state()
    assert second.entropy_coef == full.entropy_coef > 0.1  # TRL's attribute name
    ref, got = _params(full.model), _params(second.model)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


# (base overrides, the one field changed): each of the five fields changes the coefficient the trainer steps
FIELDS = {
    "use_adaptive_entropy": ({}, {"use_adaptive_entropy": False}),
    "entropy_target": ({}, {"entropy_target": 0.1}),
    "entropy_coef_delta": ({}, {"entropy_coef_delta": 0.1}),
    "entropy_coef_max": ({}, {"entropy_coef_max": 0.12}),
    "entropy_coef_min": ({"entropy_target": 0.1}, {"entropy_coef_min": 0.08}),
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_each_field_changes_behaviour(tmp_path, field):
    base, change = FIELDS[field]
    a = _trainer(tmp_path / "a", max_steps=2, **base)
    b = _trainer(tmp_path / "b", max_steps=2, **base, **change)
    coef_a = [r["entropy_coef"] for r in a.train()]
    coef_b = [r["entropy_coef"] for r in b.train()]
    assert coef_a != coef_b, (field, coef_a)
    if field != "entropy_coef_min":  # the others also change the coefficient applied at step 2, hence the weights
        pa, pb = _params(a.model), _params(b.model)
        assert any(not torch.equal(pa[k], pb[k]) for k in pa), field
