"""A stand-in for ``load_dataset("trl-internal-testing/zen", <config>)``: the prompt-only configurations TRL's text
tests read, with the Hub dataset's columns, row order and train/test split (17 + 2 rows, unshuffled). The standard
prompts are the Hub's (opening words of PEP 20's aphorisms): one test asserts on them verbatim."""

from __future__ import annotations

PROMPTS = [
    "Beautiful is better than",
    "Explicit is",
    "Simple is better",
    "Complex",
    "Flat is better than",
    "Sparse is better",
    "Readability",
    "Special cases aren't special",
    "Although practicality beats",
    "Errors should never",
    "Unless explicitly",
    "In the face of ambiguity, refuse",
    "There should be one-- and preferably",
    "Although that way may not be obvious at first unless you're",
    "Now is",
    "Although never is often",
    "If the implementation is hard to explain,",
    "If the implementation is easy",
    "Namespaces are one honking great",
]
TRAIN_ROWS = 17


def _rows(config: str) -> list[dict]:
    if config == "standard_prompt_only":
        return [{"prompt": p} for p in PROMPTS]
    if config == "conversational_prompt_only":
        return [{"prompt": [{"role": "user", "content": f"How does this line go on: {p}?"}]} for p in PROMPTS]
    raise ValueError(
        f"the offline zen stand-in has the configs 'standard_prompt_only' and 'conversational_prompt_only'; "
        f"got {config!r}"
    )


def load_zen(name: str | None = None, split: str | None = None, streaming: bool = False):
    """``datasets.load_dataset("trl-internal-testing/zen", name, split=..., streaming=...)`` without the Hub."""
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test'; got {split!r}")
    rows = _rows(name)
    parts = {"train": Dataset.from_list(rows[:TRAIN_ROWS]), "test": Dataset.from_list(rows[TRAIN_ROWS:])}
    if streaming:
        parts = {k: v.to_iterable_dataset() for k, v in parts.items()}
    if split is not None:
        return parts[split]
    return IterableDatasetDict(parts) if streaming else DatasetDict(parts)
