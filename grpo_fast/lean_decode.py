"""The sampler's forward for Llama and Qwen2 models on the CPU: the Hugging Face forward's arithmetic, op for op, in a
quarter of its calls.

Why: on a CPU a decode step of a small model at a GRPO batch (SmolLM2-135M, 16 rows, bf16) spends as much time in
per-op dispatch as in its GEMMs: the Hugging Face forward issues ~300 tensor calls per layer (module calls,
autocast casts, views, the cache object), the GEMMs are 7 per layer. A GPU removes that cost with CUDA graphs
(``grpo_fast.decode``); a CPU has no graphs, so this module removes the calls instead:
- q/k/v and gate/up projections run as one GEMM each, under the caller's CPU bf16 autocast on weights cast and
  packed for oneDNN once per ``generate`` call (as ``grpo_fast.sampler``'s packed linears do for the model's own
  forward), without autocast on the module's own weights;
- the rotary embedding rotates q and k together; no module, hook or autocast dispatch runs per op.
Everything that carries semantics is the model's own or the sampler's: the rotary tables come from the model's
``rotary_emb``, the cache writes from the sampler's cache layers, the attention from ``shared_prefix``'s decode
attention function; the rest (RMSNorm, residuals, SiLU gate, the dtypes autocast gives each result) is written as
``modeling_llama`` writes it, and the tests require the same tokens and log-probs as the model's forward.

``LeanDecoder.build`` returns None, and the sampler keeps the model's forward, for anything else: other
architectures or subclasses, PEFT or quantized layers, forward hooks or replaced forwards on the modules it
bypasses (accelerate's mixed-precision wrapper under the caller's autocast is fine), activations other than SiLU,
FSDP2's sharded weights, weights off the CPU, an autocast dtype other than bf16.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from grpo_fast.shared_prefix import _decoding_attention


@dataclasses.dataclass
class _Layer:
    attn: torch.nn.Module  # the model's attention module (the attention function reads its layer_idx)
    ln1: torch.nn.Module
    ln2: torch.nn.Module
    qkv: tuple  # one packed weight and bias, or the module's (weight, bias) pairs
    o: tuple
    gate_up: tuple
    down: tuple


def _architecture(model) -> dict | None:
    """The module classes of ``model``'s architecture when ``model`` is exactly a Llama or Qwen2 causal LM."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    for module, name in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2")):
        if type(model) is getattr(module, f"{name}ForCausalLM"):
            return {part: getattr(module, name + part) for part in ("Model", "DecoderLayer", "Attention", "MLP",
                                                                    "RMSNorm")}
    return None


def unsupported_reason(model) -> str | None:
    """Why ``LeanDecoder`` cannot compute what ``model``'s own forward computes (None: it can)."""
    arch = _architecture(model)
    if arch is None:
        return f"{type(model).__name__} is not LlamaForCausalLM or Qwen2ForCausalLM"
    body = model.model
    parts = [(body, "Model"), (body.norm, "RMSNorm")]
    for layer in body.layers:
        parts += [(layer, "DecoderLayer"), (layer.self_attn, "Attention"), (layer.mlp, "MLP"),
                  (layer.input_layernorm, "RMSNorm"), (layer.post_attention_layernorm, "RMSNorm")]
    if any(type(m) is not arch[part] for m, part in parts):
        return "a module is a subclass or another type than the architecture's own"
    linears = [model.lm_head] + [getattr(layer.self_attn, f"{x}_proj") for layer in body.layers for x in "qkvo"] + [
        getattr(layer.mlp, f"{x}_proj") for layer in body.layers for x in ("gate", "up", "down")]
    if any(type(m) is not torch.nn.Linear for m in linears) or type(body.embed_tokens) is not torch.nn.Embedding:
        return "a projection or the embedding is not plain nn.Linear / nn.Embedding (PEFT, quantized)"
    if model.config.hidden_act not in ("silu", "swish"):
        return f"hidden_act {model.config.hidden_act!r} is not SiLU"
    # The embedding and rotary modules are called as modules (their hooks and forwards run as in the model's
    # forward: gradient checkpointing's input hook, TRL's default); every other module is bypassed.
    called = (model, body.embed_tokens, body.rotary_emb)
    bypassed = [m for m in model.modules() if all(m is not c for c in called)]
    module_mod = torch.nn.modules.module
    if any(m._forward_hooks or m._forward_pre_hooks for m in [model, *bypassed]) or (
            module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks):
        return "a module has forward hooks"
    if any("forward" in m.__dict__ for m in bypassed):
        return "a submodule's forward is replaced on the instance"
    if "forward" in model.__dict__ and not ("_original_forward" in model.__dict__ and torch.is_autocast_enabled("cpu")):
        return "the model's forward is replaced (other than by accelerate's mixed precision under autocast)"
    if any(p.device.type != "cpu" for p in model.parameters()) or is_fsdp2(model):
        return "the weights are not plain CPU tensors"
    if torch.is_autocast_enabled("cpu") and not packed_bf16_autocast():
        return "CPU autocast without oneDNN's bf16 GEMM (or with a dtype other than bf16)"
    return None


def is_fsdp2(model) -> bool:
    """Whether FSDP2 shards the model (its parameters are DTensors, gathered per unit inside the forward)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def packed_bf16_autocast() -> bool:
    """Whether the caller's CPU autocast is bf16 and oneDNN computes bf16 GEMMs on this CPU (``packed_linear``)."""
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_bf16(weight, bias, rows: int):
    """``weight [out, in]`` cast to bf16 and packed for oneDNN's GEMM at about ``rows`` input rows, and ``bias`` cast
    to bf16 (or None): the arguments ``packed_linear`` takes."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), rows)
    return packed, None if bias is None else bias.detach().to(torch.bfloat16)


def packed_linear(x, weight, bias):
    """Autocast's cast of the input, then oneDNN's bf16 GEMM with fp32 accumulation on a weight packed by
    ``torch.ops.mkldnn._reorder_linear_weight`` (blocked for the CPU's AMX / AVX-512 units)."""
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, "none", [], "")


class LeanDecoder:
    """Logits of the sampler's prefill and decode steps for a Llama or Qwen2 model (see the module docstring).

    Call it as ``decoder(cache, state, ids [T], positions [T], keep=None)``: the T tokens are the B packed prompts
    at prefill (``keep`` then selects the rows whose logits are returned) or the n live rows' last tokens at decode,
    as ``state.prefill`` says; returns logits ``[T or len(keep), V]`` in the dtype the model's forward gives."""

    def __init__(self, model, rows: int):
        body = model.model
        self.embed, self.rotary, self.norm = body.embed_tokens, body.rotary_emb, body.norm
        self.packed = packed_bf16_autocast()  # else no autocast (build refuses any other)
        self.rows = rows
        self.layers = [_Layer(layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm,
                              self._weights(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                              self._weights(layer.self_attn.o_proj),
                              self._weights(layer.mlp.gate_proj, layer.mlp.up_proj), self._weights(layer.mlp.down_proj))
                       for layer in body.layers[: model.config.num_hidden_layers]]
        self.head = self._weights(model.lm_head)
        attn = body.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = (model.config.num_attention_heads, model.config.num_key_value_heads,
                                                    attn.head_dim)

    @classmethod
    def build(cls, model, rows: int) -> LeanDecoder | None:
        """The decoder for ``model`` (weights packed for ``rows`` rows under CPU bf16 autocast), or None when
        ``unsupported_reason(model)`` names a reason."""
        return None if unsupported_reason(model) is not None else cls(model, rows)

    def _weights(self, *linears):
        if not self.packed:
            return tuple((m.weight, m.bias) for m in linears)

        def cat(tensors):  # in bf16: the fp32 concatenation would be a larger copy
            tensors = [t.detach().to(torch.bfloat16) for t in tensors]
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

        bias = None if linears[0].bias is None else cat([m.bias for m in linears])
        return pack_bf16(cat([m.weight for m in linears]), bias, self.rows)

    def _linear(self, x, weights):
        if self.packed:
            return packed_linear(x, *weights)
        if len(weights) == 1:
            return F.linear(x, *weights[0])
        return torch.cat([F.linear(x, w, b) for w, b in weights], -1)

    def __call__(self, cache, state, ids, positions, keep=None):
        h = self.embed(ids)  # [T, D]
        cos, sin = self.rotary(h[None], positions[None])  # [1, T, Dh] in h's dtype
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, Dh]: one table for every head
        t, nq, nkv, dh = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        half, qk_width = dh // 2, (nq + nkv) * dh

        def heads(x):  # [T, h, Dh] -> the attention's layout: [1, h, T, Dh] at prefill, [n, h, 1, Dh] at decode
            return x.transpose(0, 1)[None] if state.prefill else x[:, :, None]

        for i, layer in enumerate(self.layers):
            qkv = self._linear(_rms_norm(h, layer.ln1), layer.qkv)  # [T, (H + 2·Hkv)·Dh]
            qk = qkv[:, :qk_width].view(t, nq + nkv, dh)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin  # rotary, as apply_rotary_pos_emb
            v = qkv[:, qk_width:].view(t, nkv, dh)
            k, v = cache.layers[i].update(heads(qk[:, nq:]), heads(v))
            out, _ = _decoding_attention(layer.attn, heads(qk[:, :nq]), k, v, None, scaling=layer.attn.scaling,
                                         sliding_window=getattr(layer.attn, "sliding_window", None),
                                         prefix_cache=cache)  # [1, T, H, Dh] or [n, 1, H, Dh]
            h = h + self._linear(out.reshape(t, nq * dh), layer.o)
            gate, up = self._linear(_rms_norm(h, layer.ln2), layer.gate_up).chunk(2, -1)
            h = h + self._linear(F.silu(gate) * up, layer.down)
        if keep is not None:
            h = h[keep]  # the norm is per row: norm(h)[keep] == norm(h[keep])
        return self._linear(_rms_norm(h, self.norm), self.head)


def _rms_norm(h, norm):
    """``LlamaRMSNorm.forward``'s arithmetic (Qwen2's is the same)."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)
