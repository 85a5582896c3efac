"""Datasets as the trainer sees them: rows with a ``prompt`` column, tokenized prompts, a resumable prompt order."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch


def load_rows(dataset) -> list[dict]:
    """A list of dicts from a list of dicts, a ``datasets.Dataset`` or a JSONL path. Each row needs ``prompt``."""
    if dataset is None:
        raise ValueError("train_dataset is required: a list of dicts, a datasets.Dataset or a JSONL path")
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif isinstance(dataset, list):
        rows = dataset
    elif hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):  # datasets.Dataset
        rows = [dict(r) for r in dataset]
    else:
        raise TypeError(f"dataset must be a list of dicts, a datasets.Dataset or a JSONL path, got {type(dataset)}")
    if not rows:
        raise ValueError("the dataset is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"dataset row {i} has no 'prompt' column; columns found: {found}")
    return rows


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


class PromptEncoder:
    """Turns a row's prompt (text or chat messages) into token ids, left-truncated to ``max_prompt_length``."""

    def __init__(self, tokenizer, max_prompt_length: int | None):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self._warned = False

    def __call__(self, prompt) -> list[int]:
        tok = self.tokenizer
        if is_conversational(prompt):
            if not getattr(tok, "chat_template", None):
                raise ValueError(
                    "the dataset's prompts are chat messages but the tokenizer has no chat_template; set "
                    "tokenizer.chat_template or give the prompts as plain text"
                )
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        elif isinstance(prompt, str):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        ids = list(ids)
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to zero tokens")
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            if not self._warned:
                warnings.warn(
                    f"a prompt of {len(ids)} tokens exceeds max_prompt_length={limit}; prompts are left-truncated "
                    "(the end of the prompt, next to the completion, is kept)",
                    stacklevel=2,
                )
                self._warned = True
            ids = ids[-limit:]
        return ids


class PromptOrder:
    """Seeded epoch-wise shuffle of the rows; ``position`` (rows consumed) is all a checkpoint needs to resume."""

    def __init__(self, n_rows: int, seed: int, position: int = 0):
        self.n_rows, self.seed, self.position = n_rows, seed, position

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_rows, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n_rows)
            perm = self._perm(epoch)
            n = min(k - len(out), self.n_rows - offset)
            out += perm[offset : offset + n]
            self.position += n
        return out
