"""grpo_loss against TRL 1.16's own ``GRPOTrainer._compute_loss``, called unbound on a minimal stand-in trainer.

The stand-in carries exactly the attributes ``_compute_loss`` reads; its ``_get_per_token_logps_and_entropies``
returns our log-prob / entropy tensors, so TRL's autograd graph starts at the same leaf as ours. One process:
``gather``/``reduce``/``pad_across_processes`` are identities (``num_processes`` may still differ from 1 to test
the normalizer). Every loss type × IS level × β on/off × δ on/off × top_entropy_quantile 1.0/0.5, fp64.
"""

from __future__ import annotations

import itertools
import math
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

from grpo_fast.kernels.grpo_loss import LOSS_TYPES, LossOptions, grpo_loss, high_entropy_mask  # noqa: E402
N, L, P = 6, 9, 3
MAX_COMPLETION_LENGTH = 12


def _accelerator(num_processes):
    return types.SimpleNamespace(
        num_processes=num_processes,
        gather=lambda t: t,
        reduce=lambda t, reduction="sum": t,
        pad_across_processes=lambda t, dim=0, pad_index=0: t,
        gather_for_metrics=lambda t: t,
        sync_gradients=True,
    )


def _stand_in(logp, entropy, cfg):
    args = types.SimpleNamespace(
        use_bias_correction_kl=cfg["use_bias_correction_kl"], delta=cfg["delta"], steps_per_generation=cfg["spg"],
        sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
    )
    trainer = types.SimpleNamespace(
        args=args, accelerator=_accelerator(cfg["nproc"]), model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        loss_type=cfg["loss_type"], importance_sampling_level=cfg["level"], beta=cfg["beta"],
        epsilon_low=0.2, epsilon_high=cfg["epsilon_high"], top_entropy_quantile=cfg["rho"],
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=MAX_COMPLETION_LENGTH,
        current_gradient_accumulation_steps=cfg["ga"], get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    return trainer


def _batch(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.25
    ref = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.25
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    adv[2] = 0.0
    lengths = torch.tensor([L, 0, 1, L - 2, 4, L])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ent = torch.rand(N, L, generator=g, dtype=torch.float64) * 2
    return [t.to(dtype) if t.is_floating_point() else t for t in (lp, old, ref, adv, mask, ent)]


def _trl(cfg, lp, old, ref, adv, mask, ent):
    x = lp.detach().clone().requires_grad_()
    trainer = _stand_in(x, ent, cfg)
    inputs = {
        "prompt_ids": torch.ones(N, P, dtype=torch.long), "prompt_mask": torch.ones(N, P, dtype=torch.long),
        "completion_ids": torch.ones(N, L, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "ref_per_token_logps": ref, "num_items_in_batch": torch.tensor(cfg["nib"], dtype=lp.dtype),
    }
    if cfg["off_policy"]:
        inputs["old_per_token_logps"] = old
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), x.grad, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _ours(cfg, lp, old, ref, adv, mask, ent, dev="cpu"):
    lp, old, ref, adv, mask, ent = (t.to(dev) for t in (lp, old, ref, adv, mask, ent))
    x = lp.detach().clone().requires_grad_()
    emask = high_entropy_mask(ent, mask, cfg["rho"]) if cfg["rho"] < 1.0 else None
    options = LossOptions(
        loss_type=cfg["loss_type"], epsilon=0.2, epsilon_high=cfg["epsilon_high"], delta=cfg["delta"],
        beta=cfg["beta"], use_bias_correction_kl=cfg["use_bias_correction_kl"], importance_sampling_level=cfg["level"],
        max_completion_length=MAX_COMPLETION_LENGTH,
    )
    loss, metrics = grpo_loss(
        x, old if cfg["off_policy"] else None, ref, adv, mask, options,
        num_items_in_batch=torch.tensor(cfg["nib"], dtype=lp.dtype, device=dev), entropy=ent, entropy_mask=emask,
        gradient_accumulation_steps=cfg["ga"], steps_per_generation=cfg["spg"], num_processes=cfg["nproc"],
    )
    loss.backward()
    return loss.detach().cpu(), x.grad.cpu(), {k: v.cpu() for k, v in metrics.items()}


def _config(loss_type, level, beta, delta, rho, i):
    return dict(
        loss_type=loss_type, level=level, beta=beta, delta=delta, rho=rho,
        epsilon_high=4.0 if loss_type == "cispo" else 0.28, use_bias_correction_kl=i % 3 != 2,
        off_policy=i % 4 != 3, ga=(1, 2)[i % 2], spg=(1, 4)[i % 2], nproc=(1, 2)[i % 3 == 1], nib=41.0,
    )


def _compare_metrics(metrics, t_metrics, ulps, what):
    """TRL reduces its metrics with an fp32 token count: they agree to the fp32 rounding floor of their magnitude."""
    for name, value in t_metrics.items():
        assert name in metrics, f"{what}: metric {name} missing (ours: {sorted(metrics)})"
        ours = metrics[name].double().item()
        tol = ulps * torch.finfo(torch.float32).eps * max(1.0, abs(value))
        assert (math.isnan(ours) and math.isnan(value)) or abs(ours - value) <= tol, f"{what} {name}: {ours} vs {value}"


GRID = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [None, 1.5], [1.0, 0.5]))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_torch_path_matches_trl_fp64(loss_type, force_backend, numerics):
    force_backend("torch")
    for i, (lt, level, beta, delta, rho) in enumerate(GRID):
        if lt != loss_type:
            continue
        cfg = _config(lt, level, beta, delta, rho, i)
        batch = _batch(torch.float64, seed=i)
        (loss, grad, metrics), (t_loss, t_grad, t_metrics) = _ours(cfg, *batch), _trl(cfg, *batch)
        # Both in fp64: any difference beyond 1e-10 relative is a formula difference, not rounding, on every CPU.
        torch.testing.assert_close(loss, t_loss, rtol=1e-10, atol=1e-12, msg=f"{cfg} loss")
        torch.testing.assert_close(grad, t_grad, rtol=1e-10, atol=1e-12, msg=f"{cfg} d logp")
        _compare_metrics(metrics, t_metrics, numerics.ULPS, str(cfg))


TRITON_SUBSET = [GRID[i] for i in range(0, len(GRID), 5)]


@pytest.mark.parametrize("case", TRITON_SUBSET, ids=["-".join(map(str, c)) for c in TRITON_SUBSET])
def test_triton_path_matches_trl_fp32(case, force_backend, numerics):
    """The kernels in fp32 against TRL in fp64, within twice the error of TRL's own code run in fp32."""
    force_backend("triton")
    i = GRID.index(case)
    cfg = _config(*case, i)
    batch64 = _batch(torch.float64, seed=i)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU machine, else the interpreter
    batch32 = [t.float() if t.is_floating_point() else t for t in batch64]
    (loss, grad, metrics), (t_loss, t_grad, t_metrics) = _ours(cfg, *batch32, dev=dev), _trl(cfg, *batch64)
    p_loss, p_grad, _ = _trl(cfg, *batch32)
    scale = numerics.condition_scale((t_grad, batch64[0]))
    numerics.check_2x(loss, t_loss, p_loss, name=f"{cfg} loss", scale=scale)
    numerics.check_2x(grad, t_grad, p_grad, name=f"{cfg} d logp")
    _compare_metrics(metrics, t_metrics, numerics.ULPS, str(cfg))
