"""Worker for tests/test_distributed.py::test_fsdp2_fused_logprobs_match_unsharded, under torch.distributed.run (gloo).

The TRL-based trainer's log-prob path (``FastGRPOTrainer._get_per_token_logps_and_entropies``: ``call_as_forward``,
the shared-prefix forward, the fused LM head) on a model sharded with FSDP2 (``fully_shard`` per decoder layer and
the root, as accelerate's FSDP2 plugin wraps a Llama) against an unsharded copy: each rank's log-probs on its own
batch, and the gradients (FSDP2 averages them over ranks) against the mean of the unsharded gradients of both ranks'
batches. accelerate selects FSDP only on GPU-type setups, so this drives FSDP2 directly.

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_worker.py OUT.pt
"""

import contextlib
import copy
import sys
import types

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from grpo_fast.integrations.trl import FastGRPOTrainer
from grpo_fast.testing import tiny_causal_lm

L = 4


def batch(rank: int):
    """Two groups of four completions (a shared, left-padded prompt each): ``ids, mask [8, 5 + L]``, weights."""
    g = torch.Generator().manual_seed(100 + rank)
    prompts = torch.randint(3, 50, (2, 5), generator=g).repeat_interleave(4, 0)
    ids = torch.cat([prompts, torch.randint(3, 50, (8, L), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[4:, 0] = 0  # the second prompt is one token shorter (left padding)
    mask[1, 5 + 2 :] = 0  # a completion that ended early
    return ids, mask, torch.randn(8, L, generator=g)


def logprobs(model, ids, mask):
    trainer = object.__new__(FastGRPOTrainer)  # the real method on a stand-in trainer (no TRL set-up)
    trainer.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m, autocast=contextlib.nullcontext)
    trainer.temperature, trainer.num_generations = 0.7, 4
    trainer.args = types.SimpleNamespace(cast_lm_head_to_fp32=False)
    logp, _, _ = FastGRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, L)
    return logp


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_causal_lm(seed=1)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    ids, mask, w = batch(rank)
    logp = logprobs(model, ids, mask)
    (logp * w * mask[:, -L:]).sum().backward()

    ref_logp = None
    for r in range(world):  # the unsharded model on every rank's batch: the mean gradient FSDP2 reduces to
        ids_r, mask_r, w_r = batch(r)
        lp = logprobs(ref, ids_r, mask_r)
        ((lp * w_r * mask_r[:, -L:]).sum() / world).backward()
        if r == rank:
            ref_logp = lp.detach()
    logp_err = (logp.detach() - ref_logp)[mask[:, -L:].bool()].abs().max()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    grad_err = max(((p.grad.full_tensor() - grads[n]).abs().max() / grads[n].abs().max()).item()
                   for n, p in model.named_parameters())
    sharded = all(hasattr(p, "full_tensor") for p in model.parameters())
    errs = torch.tensor([logp_err.item(), grad_err])
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save({"logp_err": errs[0].item(), "grad_err": errs[1].item(), "sharded": sharded,
                    "grad_norm": sum(g.norm() ** 2 for g in grads.values()).sqrt().item()}, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
