"""Tiny offline models and a character tokenizer for tests, examples and smoke runs (nothing is downloaded)."""

from __future__ import annotations

import functools

import torch

CHARS = list("0123456789+-*/=?:.,() abcdefghijklmnopqrstuvwxyzAW\n")


def tiny_tokenizer():
    """A character-level fast tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then one id per character, and a
    minimal chat template (``u: ...`` lines, generation prompt ``a: ``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a: {% endif %}"
    )
    return fast


def tiny_causal_lm(kind: str = "llama", vocab_size: int = len(CHARS) + 3, seed: int = 0, init_std: float = 0.3,
                   hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, tie: bool = False):
    """A random-init Llama or Qwen2 (GQA) small enough for CPU tests. ``init_std`` ~0.3 keeps logits far from
    uniform so greedy decoding does not flip on near-ties."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=init_std,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    if kind == "llama":
        config = LlamaConfig(**common)
    elif kind == "qwen2":
        config = Qwen2Config(**common)
    else:
        raise ValueError(f"kind must be 'llama' or 'qwen2', got {kind!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@functools.cache
def cpu_bf16_attention_error() -> str | None:
    """Why torch's CPU bf16 masked SDPA fails on this machine, or None. torch 2.13 refuses it when
    ``ATEN_CPU_CAPABILITY`` forces a narrower vector width than an AVX-512 CPU has ("pack_vnni2 is only supported
    when avx512 is supported"); TRL's and our bf16 CPU runs fail alike there."""
    q = torch.randn(1, 1, 64, 8, dtype=torch.bfloat16)  # long enough for the blocked CPU kernel
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(64, 64, dtype=torch.bool))
    except RuntimeError as e:
        return str(e)
    return None
