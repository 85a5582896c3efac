"""Data parallelism over prompts on ``torch.distributed`` (``torchrun --nproc-per-node K -m grpo_fast.cli train``).

What runs where:
- every rank holds the whole model and samples whole groups (its slice of the global prompt batch), so group
  statistics never cross ranks; rewards are all-gathered before normalization anyway, so
  ``scale_rewards="batch"`` and the logged reward statistics are global;
- gradients are averaged with one flattened all-reduce per optimizer step (DDP's semantics, without its
  overlap of communication and backward); every rank then sees the same gradient norm, so a step skipped for a
  non-finite gradient is skipped everywhere;
- only rank 0 logs, plots and writes checkpoints (the weights are replicated, so its checkpoint is the model).

With ``fsdp="full_shard"`` the weights, gradients and optimizer states are sharded instead (FSDP2,
``torch.distributed.fsdp.fully_shard``): one FSDP unit per decoder layer plus the root (embeddings, final norm,
LM head — tied or not). What changes:
- the training forward runs inside the root module's call (``call_through_root``), so the root unit is all-gathered
  around it; the fused LM-head op then reads the *gathered* head weight (the op never runs per shard) and its
  gradient is reduce-scattered with the others at the end of the backward;
- generation runs with every unit gathered and kept gathered (``gathered_for_generation``): ranks decode different
  numbers of steps, so no collective may run inside the decode loop;
- gradients arrive averaged and sharded (no extra all-reduce); the clipped norm is global, so a skipped step is
  skipped on every rank;
- checkpoints gather a full state dict on every rank and rank 0 writes it: the same HF-loadable files as without
  FSDP, resumable with or without it on any number of ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
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
    # Collect dead trainers first: an FSDP2 model in a reference cycle keeps the process group alive until the
    # interpreter's final teardown, where gloo then aborted ~1 run in 15 under load ("terminate called without an
    # active exception", after a clean destroy); collected here, nothing distributed outlives the group.
    gc.collect()
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


# ---------------------------------------------------------------------------------------------------- FSDP2


def _fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model) -> bool:
    return dist.is_available() and isinstance(model, _fsdp_module_type())


def shard_model(model, *, trainable: bool = True):
    """FSDP2 full sharding in place: each decoder layer its own unit, then the root (embeddings, final norm, LM head;
    a tied head shares the embedding's unit). Needs an initialized process group; returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"fsdp: {type(model).__name__} has no decoder .layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not trainable:
        model.requires_grad_(False)
    return model


def call_through_root(model, fn):
    """Runs ``fn()`` inside ``model.__call__`` so that wrapper hooks on the root module run around it: under FSDP2
    the root unit (embeddings, final norm, LM head) is gathered before ``fn`` reads those weights directly, and its
    gradients are reduce-scattered after the backward. A plain model just calls ``fn()``."""
    if not is_sharded(model):
        return fn()
    had = "forward" in model.__dict__  # e.g. accelerate's hooks keep their own instance-level forward
    previous = model.__dict__.get("forward")
    model.forward = lambda: fn()  # an instance attribute shadows the class's forward for this one call
    try:
        return model()
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward


@contextlib.contextmanager
def gathered_for_generation(*models):
    """Within the block every FSDP2 unit of ``models`` is gathered once and stays gathered, so the forwards inside
    (a decode loop whose length differs between ranks) run no collective. Plain models pass through."""
    roots = [m for m in models if m is not None and is_sharded(m)]
    units = [m for root in roots for m in root.modules() if isinstance(m, _fsdp_module_type())]
    inner = [u for u in units if not any(u is root for root in roots)]  # the root never reshards after forward
    for unit in units:
        unit.unshard()
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


def full_tensor(t):
    """A DTensor (an FSDP2 gradient norm) as a plain tensor; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
