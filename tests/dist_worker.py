"""Worker for tests/test_distributed.py and tests/test_peft.py: a short GRPO run of TRL's trainer or ours on a tiny
random-init model, launched alone or under ``torch.distributed.run`` (gloo on the CPU, through accelerate).

    python tests/dist_worker.py OUT_DIR [--trainer fast|trl] [--steps 3] [--fsdp] [--no_sampler] [--no_update]
        [--reseed] [--save_steps N] [--resume] [--lora] [--prompts 8]

writes OUT_DIR/final.pt (rank 0): the full parameters, TRL's log history, how the policy's parameters are held after
``accelerator.prepare`` (``sharding``; ``sharded``: all DTensors) and the largest parameter difference between ranks
(0 unless replicas drifted apart; not measured when sharded).

``--fsdp``: FSDP2 through the Trainer and accelerate (``fsdp="full_shard"``, ``fsdp_version`` 2); on these CPU
processes only with ``allow_fsdp_on_cpu`` (accelerate would otherwise train as DDP; see tests/test_distributed.py).

GRPOTrainer keys the sampler's per-prompt seeds by the prompt's index in the global batch (rank · prompts per rank +
local index), so 2 ranks x b sample exactly what 1 rank x 2b samples. One test-only seeding makes TRL's generation
comparable across runs (the trained code is untouched):
- ``--reseed``: the global torch RNG is reset from (rank, global step) before each generation, so TRL's generate
  samples the same completions in TRL's trainer and ours (whose group shuffle draws fewer random numbers than TRL's
  row shuffle, which would otherwise shift the next step's samples).
"""

import argparse
import os
import warnings

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer as TRLGRPOTrainer

from grpo_fast import GRPOConfig, GRPOTrainer
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

PROMPTS = [f"{a}{op}{b}=" for a, b in ((3, 4), (12, 5), (7, 8), (1, 1), (9, 2), (6, 3), (20, 7), (5, 5))
           for op in "+*"]
GLOBAL_COMPLETIONS = 16  # 4 prompts x G = 4 per optimizer step, split over the ranks


def odd_digits(prompts, completions, **kw):
    """Deterministic in the completion's characters."""
    return [sum(ch in "13579" for ch in c) / (1 + len(c)) for c in completions]


def allow_fsdp_on_cpu():
    """Test-only: accelerate selects FSDP on CPU processes (MULTI_CPU, gloo) too; tests/test_distributed.py's
    docstring says why and what this changes. Everything after the distributed type (Trainer, prepare, fully_shard,
    the trainers' code) runs unpatched."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what AcceleratorState.__init__ does with an FSDP plugin for the GPU-like types (MULTI_GPU, ...)
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__


def sharding(model, world: int) -> dict:
    """How the prepared model holds its parameters: FSDP2 (``fully_shard``) makes each one a DTensor sharded on
    dim 0 over a mesh of all ranks, so this rank keeps about 1/world of the elements; DDP keeps plain tensors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    dtensors = [q for q in params if isinstance(q, DTensor)]
    return {
        "all_dtensor": len(dtensors) == len(params) > 0,
        "placements": sorted({str(q.placements) for q in dtensors}),
        "meshes": sorted({(q.device_mesh.device_type, q.device_mesh.size()) for q in dtensors}),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "local_fraction": sum(q.to_local().numel() if isinstance(q, DTensor) else q.numel() for q in params)
        / sum(q.numel() for q in params),
        "world": world,
    }


class RecordSharding(TrainerCallback):
    """The policy's sharding right after ``accelerator.prepare`` (on_train_begin comes after it)."""

    def __init__(self, trainer, world: int):
        self.trainer, self.world, self.result = trainer, world, None

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        self.result = sharding(t.accelerator.unwrap_model(t.model_wrapped), self.world)
        self.result["distributed_type"] = str(t.accelerator.distributed_type.value)
        plugin = getattr(t.accelerator.state, "fsdp_plugin", None)
        self.result["fsdp_version"] = getattr(plugin, "fsdp_version", None)
        if t.ref_model is not None:
            self.result["ref_all_dtensor"] = sharding(t.ref_model, self.world)["all_dtensor"]


def _make_class(base, reseed: bool):
    class Worker(base):
        def _generate_single_turn(self, *args, **kwargs):
            if reseed:
                torch.manual_seed(1000 * self.state.global_step + self.accelerator.process_index)
            return super()._generate_single_turn(*args, **kwargs)

    return Worker


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--trainer", choices=["fast", "trl"], default="fast")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--loss_type", default="dapo")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--no_sampler", action="store_true", help="use_shared_prefix_sampler = False")
    p.add_argument("--no_update", action="store_true", help="use_shared_prefix_update = False")
    p.add_argument("--reseed", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--prompts", type=int, default=8, help="dataset size; 4 prompts per optimizer step")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    fsdp = {}
    if args.fsdp:
        allow_fsdp_on_cpu()
        fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    cfg = GRPOConfig(
        output_dir=args.out, use_cpu=True, bf16=False, per_device_train_batch_size=GLOBAL_COMPLETIONS // world,
        num_generations=4, max_completion_length=4, learning_rate=1e-2 if args.lora else 1e-3,
        max_steps=args.steps, logging_steps=1, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, report_to="none", seed=0, gradient_checkpointing=False, warmup_steps=0,
        loss_type=args.loss_type, beta=args.beta, adam_epsilon=1e-3, lr_scheduler_type="constant",
        disable_tqdm=True, plot=False, use_shared_prefix_sampler=not args.no_sampler,
        use_shared_prefix_update=not args.no_update, **fsdp,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    cls = _make_class(GRPOTrainer if args.trainer == "fast" else TRLGRPOTrainer, args.reseed)
    path = os.path.join(args.out, "init")  # TRL builds its reference model (beta > 0) from a path
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(path):
        tiny_causal_lm(seed=4).save_pretrained(path)
    if world > 1:  # GRPOConfig (TrainingArguments) has set up the process group through accelerate
        dist.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = Dataset.from_list([{"prompt": q} for q in PROMPTS[: args.prompts]])
        t = cls(path, [odd_digits], args=cfg, train_dataset=data, processing_class=tiny_tokenizer(),
                peft_config=peft_config)
        record = RecordSharding(t, world)
        t.add_callback(record)
        t.train(resume_from_checkpoint=args.resume or None)
    model = t.accelerator.unwrap_model(t.model)
    sharded = record.result["all_dtensor"]
    state = t.accelerator.get_state_dict(t.model)  # full weights on rank 0 (gathered under FSDP)
    drift = 0.0
    if world > 1 and not sharded:  # replicas must stay identical
        flat = torch.cat([q.detach().flatten() for q in model.parameters()])
        others = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(others, flat)
        drift = max((o - flat).abs().max().item() for o in others)
    if t.accelerator.is_main_process:
        params = {k: v.detach().clone().cpu() for k, v in state.items()}
        torch.save({"params": params, "history": t.state.log_history, "sharded": sharded, "sharding": record.result,
                    "drift": drift, "ref_model": t.ref_model is not None}, os.path.join(args.out, "final.pt"))
    t.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
