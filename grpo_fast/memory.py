"""Pre-flight memory estimate for a configured run, so a batch that cannot fit warns before the first step."""

from __future__ import annotations

import os
import warnings

import torch


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes(model, args, prompt_tokens: int, has_ref: bool) -> dict[str, int]:
    """A coarse upper estimate, in bytes, of what one optimizer step holds at its peak.

    weights + gradients + AdamW's two moments (+ a frozen reference copy); the sampler's KV cache, one prompt
    per group plus G suffixes (B·P + N·L tokens); the update's activations for one minibatch — B·P + N·L tokens
    with the shared-prefix update, N·(P + L) without — counted as ~18·D values per token and layer (attention and
    MLP inputs kept for backward; ~2·D with gradient checkpointing); the fused head keeps only chunk × V logits.
    With ``fsdp`` the persistent states are split over the ranks and one full copy is gathered for generation.
    """
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    width = next(model.parameters()).element_size()
    layers = getattr(cfg, "num_hidden_layers", 1)
    d = getattr(cfg, "hidden_size", 1)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    g = args.num_generations
    n = args.generation_batch_size // args.world_size  # completions this rank samples
    b = n // g
    L = args.max_completion_length or 256
    kv_tokens = b * prompt_tokens + n * L
    minibatch = args.per_device_train_batch_size
    if args.shared_prefix_update and minibatch % g == 0:
        act_tokens = minibatch // g * prompt_tokens + minibatch * L
    else:
        act_tokens = minibatch * (prompt_tokens + L)
    act_per_token = (2 if args.gradient_checkpointing else 18) * d * width * layers
    states = n_params * width * (4 + (1 if has_ref else 0))
    if getattr(args, "fsdp", None) and args.world_size > 1:
        states = states // args.world_size + n_params * width  # shards + the gathered copy generation runs on
    return {
        "weights_grads_optimizer": states,
        "kv_cache": kv_tokens * layers * 2 * kv_heads * head_dim * width,
        "activations": act_tokens * act_per_token,
        "lm_head_chunk": 1024 * getattr(cfg, "vocab_size", 1) * 4 * 3,
    }


def preflight(model, args, prompt_tokens: int, has_ref: bool) -> dict[str, int]:
    """Warns when the estimate exceeds the memory available now, naming the knobs that lower it."""
    parts = estimate_bytes(model, args, prompt_tokens, has_ref)
    total = sum(parts.values())
    free = available_bytes(next(model.parameters()).device)
    if free is not None and total > 0.9 * free:
        detail = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in parts.items())
        warnings.warn(
            f"estimated peak memory {total / 2**30:.1f} GiB ({detail}) exceeds the {free / 2**30:.1f} GiB available; "
            "lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), "
            "num_generations or max_completion_length, or turn on gradient_checkpointing",
            stacklevel=3,
        )
    return parts


OOM_HINT = (
    "out of memory during {phase}: lower per_device_train_batch_size (and raise gradient_accumulation_steps to keep "
    "the effective batch), num_generations, max_completion_length or max_prompt_length, or set "
    "gradient_checkpointing=True"
)
