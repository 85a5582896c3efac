"""Data parallelism over prompts on ``torch.distributed`` (``torchrun --nproc-per-node K -m grpo_fast.cli train``).

What runs where:
- every rank holds the whole model and samples whole groups (its slice of the global prompt batch), so group
  statistics never cross ranks; rewards are all-gathered before normalization anyway, so
  ``scale_rewards="batch"`` and the logged reward statistics are global;
- gradients are averaged with one flattened all-reduce per optimizer step (DDP's semantics, without its
  overlap of communication and backward); every rank then sees the same gradient norm, so a step skipped for a
  non-finite gradient is skipped everywhere;
- only rank 0 logs, plots and writes checkpoints (the weights are replicated, so its checkpoint is the model).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_shutdown)  # we created the group, so we tear it down (gloo aborts on a dirty exit)
    return dist.get_rank(), dist.get_world_size()


def _shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``t`` along dim 0, in rank order (equal shapes on every rank)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Averages ``.grad`` over ranks in one flattened all-reduce; a missing grad counts as zero."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float | None], device: torch.device) -> dict[str, float | None]:
    """Averages logged metrics over ranks (NaN/None ignored); every rank must pass the same keys."""
    if not active():
        return values
    keys = sorted(values)
    raw = [float("nan") if values[k] is None else float(values[k]) for k in keys]
    raw = torch.tensor(raw, dtype=torch.float64, device=device)
    valid = (~raw.isnan()).double()
    both = torch.stack([raw.nan_to_num(0.0), valid])
    dist.all_reduce(both)
    out = {}
    for i, k in enumerate(keys):
        out[k] = (both[0, i] / both[1, i]).item() if both[1, i] > 0 else None
    return out


def barrier() -> None:
    if active():
        dist.barrier()
