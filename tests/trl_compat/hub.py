"""Offline stand-ins for the Hub repositories TRL's GRPO tests name, laid out as a Hugging Face hub cache.

Each ``trl-internal-testing/tiny-*`` model is rebuilt in code with the shapes TRL's own generator uses (hidden size
8 for causal LMs, 16 for reward models, 2 layers, 4 heads, 2 key/value heads, 4 experts for MoE), random init, with
a generation config and a tokenizer. Tokenizers are character-level (printable ASCII plus the family's special
tokens) with a chat template in the family's shape, so vocabularies stay ~100 tokens and a test takes seconds.

Deliberate differences from the Hub models, each visible in a test's outcome: token ids differ (tests that hard-code
Qwen2.5 ids cannot pass); with ~100 tokens a random model samples EOS about once per 100 tokens, where the Hub's
151k-token models practically never do; weights are float32, where the Hub's are bfloat16 (TRL loads the stored
dtype, and a CPU without bfloat16 units runs bfloat16 matmuls ~20x slower).

``build_hub(root)`` writes ``root/models--<org>--<name>/{refs/main, snapshots/<rev>/...}``; with ``HF_HUB_CACHE=root``
and ``HF_HUB_OFFLINE=1``, ``from_pretrained("trl-internal-testing/tiny-...")`` loads the stand-in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

ORG = "trl-internal-testing"
REVISION = "0" * 39 + "1"  # a commit-hash-shaped name for the single snapshot

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3 = CHATML[: -len("{% endif %}")] + (
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (
    "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
GEMMA = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
COHERE = (
    "<BOS_TOKEN>{% for m in messages %}<|START_OF_TURN_TOKEN|><|{{ m['role'] | upper }}_TOKEN|>{{ m['content'] }}"
    "<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)

# family -> (special tokens in id order, eos, pad or None, bos or None, chat template)
TOKENIZERS = {
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>", None, CHATML),
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "<|im_end|>", "<|endoftext|>", None, QWEN3,
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>"],
        "<|eot_id|>", None, "<|begin_of_text|>", LLAMA3,
    ),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "</s>", None, "<s>", MISTRAL),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<pad>", "<bos>", GEMMA,
    ),
    "cohere": (
        ["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
         "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"],
        "<|END_OF_TURN_TOKEN|>", "<PAD>", "<BOS_TOKEN>", COHERE,
    ),
}

CAUSAL = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)
REWARD = dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32,
              num_labels=1)
MOE = dict(CAUSAL, num_experts_per_tok=2)
NEMOTRON_H = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=2, intermediate_size=32,
                  layers_block_type=["mamba", "attention"], mamba_num_heads=4, mamba_head_dim=4, n_groups=1,
                  ssm_state_size=8)

# repository name -> (config class, model class, tokenizer family, config overrides)
MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2Config", "Qwen2ForCausalLM", "qwen", CAUSAL),
    "tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2Config", "Qwen2ForSequenceClassification", "qwen", REWARD),
    "tiny-Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(CAUSAL, tie_word_embeddings=False)),
    "tiny-Qwen3ForSequenceClassification": ("Qwen3Config", "Qwen3ForSequenceClassification", "qwen3", REWARD),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3", dict(MOE, num_experts=4)),
    "tiny-LlamaForCausalLM-3.2": ("LlamaConfig", "LlamaForCausalLM", "llama3", CAUSAL),
    "tiny-LlamaForSequenceClassification-3.2": ("LlamaConfig", "LlamaForSequenceClassification", "llama3", REWARD),
    "tiny-MistralForCausalLM-0.2": ("MistralConfig", "MistralForCausalLM", "mistral", CAUSAL),
    "tiny-Gemma2ForCausalLM": ("Gemma2Config", "Gemma2ForCausalLM", "gemma", dict(CAUSAL, head_dim=2)),
    "tiny-Cohere2ForCausalLM": ("Cohere2Config", "Cohere2ForCausalLM", "cohere", CAUSAL),
    "tiny-GptOssForCausalLM": ("GptOssConfig", "GptOssForCausalLM", "qwen", dict(MOE, num_local_experts=4, head_dim=2)),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeConfig", "Glm4MoeForCausalLM", "qwen",
                                dict(MOE, n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=1)),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHConfig", "NemotronHForCausalLM", "qwen", NEMOTRON_H),
    "tiny-RemoteForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM", "qwen", CAUSAL),
}

# custom code for tiny-RemoteForCausalLM: loading it needs trust_remote_code, as on the Hub
REMOTE_CONFIG_PY = '''from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
'''
REMOTE_MODELING_PY = '''from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
'''


def tokenizer_for(family: str):
    """A character-level fast tokenizer: the family's special tokens first, then one id per printable ASCII
    character and newline; its chat template has the family's turn markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, eos, pad, bos, template = TOKENIZERS[family]
    chars = [c for c in string.printable if c.isprintable()] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + ["<unk>"] * ("<unk>" not in specials) + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
                                   unk_token="<unk>", additional_special_tokens=[s for s in specials
                                                                                 if s not in (eos, pad, bos)])
    fast.chat_template = template
    return fast


def _init_weights(model: torch.nn.Module) -> None:
    """Xavier-uniform projections and N(0, 0.02) embeddings: logits stay small, sampling is near uniform."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)


def build_model(name: str, path: Path) -> None:
    """Write the stand-in for ``trl-internal-testing/<name>`` (weights, config, tokenizer, generation config)."""
    import transformers

    config_cls, model_cls, family, overrides = MODELS[name]
    tokenizer = tokenizer_for(family)
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    config = getattr(transformers, config_cls)(**ids, **overrides)
    torch.manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    model = getattr(transformers, model_cls)(config)
    _init_weights(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.GenerationConfig(**{k: v for k, v in ids.items() if k != "vocab_size"}).save_pretrained(path)
    if name == "tiny-RemoteForCausalLM":
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="remote", architectures=["RemoteForCausalLM"], auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        })
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        (path / "configuration_remote.py").write_text(REMOTE_CONFIG_PY)
        (path / "modeling_remote.py").write_text(REMOTE_MODELING_PY)


def fingerprint() -> str:
    """Changes when this file or transformers changes, so a stale cache is never reused. Reads the version from the
    package metadata: importing transformers here would fix huggingface_hub's settings before the caller sets them."""
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes() + version("transformers").encode())
    return digest.hexdigest()[:12]


def build_hub(root: Path) -> Path:
    """Build every stand-in under ``root`` (a hub cache) once; concurrent builders race safely by atomic rename."""
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".building-"))
    try:
        for name in MODELS:
            repo = tmp / f"models--{ORG}--{name}"
            (repo / "refs").mkdir(parents=True)
            (repo / "refs" / "main").write_text(REVISION)
            build_model(name, repo / "snapshots" / REVISION)
        (tmp / ".complete").write_text("ok")
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: its copy is identical
            if not (root / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
