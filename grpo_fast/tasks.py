"""Training tasks generated offline from a seed, and JSONL loading.

Each example is a dict with a ``prompt`` (chat format ``[{"role": "user", "content": ...}]`` or plain text) plus
the columns its reward function reads (``answer``; ``numbers`` and ``target``). Train and eval splits are disjoint
by construction: a problem belongs to the eval split iff a stable hash of its canonical key falls in a fixed
1-in-``EVAL_BUCKETS`` bucket, so no eval problem can appear in train whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

EVAL_BUCKETS = 10  # one problem in ten belongs to the eval split
_SPLITS = ("train", "eval")
_OP_ALIASES = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "x": "*", "\u00d7": "*"}
# Difficulty level → (digits per operand, operators).
ARITHMETIC_LEVELS = {1: (1, ("+", "-")), 2: (2, ("+", "-")), 3: (2, ("+", "-", "*")), 4: (3, ("+", "-", "*")),
                     5: (4, ("+", "-", "*"))}  # fmt: skip
ARITHMETIC_INSTRUCTION = "Give the final answer on its own line as 'Answer: <number>'."
COUNTDOWN_INSTRUCTION = "Give the final answer on its own line as 'Answer: <expression>'."


def _in_split(key: str, split: str | None) -> bool:
    if split is None:
        return True
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % EVAL_BUCKETS
    return (bucket == 0) == (split == "eval")


def _prompt(text: str, chat: bool) -> list[dict[str, str]] | str:
    return [{"role": "user", "content": text}] if chat else text


def _check_split(split: str | None) -> None:
    if split is not None and split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS} (or None for no split), got {split!r}")


def _sample_unique(n: int, seed: int, split: str | None, draw: Callable[[random.Random], tuple[str, dict]], what: str):
    """Draw ``n`` distinct problems (by key) from ``draw`` with ``random.Random(seed)``, keeping ``split``'s."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_split(split)
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"found only {len(out)} distinct {what} problems for split={split!r}; ask for fewer "
                             f"than n={n} or a harder setting (more digits, operators or numbers)")  # fmt: skip
        key, example = draw(rng)
        if key in seen or not _in_split(key, split):
            continue
        seen.add(key)
        out.append(example)
    return out


def arithmetic_task(
    n: int,
    seed: int,
    digits: int = 2,
    ops: Sequence[str] = ("+",),
    level: int | None = None,
    chat: bool = True,
    split: str | None = None,
) -> list[dict[str, Any]]:
    """``n`` distinct problems "What is a op b?" with operands of exactly ``digits`` digits (0-9 for one digit).

    ``level`` (1-5, see ``ARITHMETIC_LEVELS``) overrides ``digits`` and ``ops``; ops are ``+``, ``-``, ``*`` (``×``
    accepted). Answers are exact integers as strings (negative for some subtractions). ``split`` keeps only that
    split's problems (``get_task`` sets it).
    """
    if level is not None:
        if level not in ARITHMETIC_LEVELS:
            raise ValueError(f"level must be one of {sorted(ARITHMETIC_LEVELS)}, got {level!r}")
        digits, ops = ARITHMETIC_LEVELS[level]
    if not 1 <= digits <= 9:
        raise ValueError(f"digits must be in 1..9, got {digits}")
    bad = [op for op in ops if op not in _OP_ALIASES]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(set(_OP_ALIASES))}, got {list(ops)}")
    ops = sorted({_OP_ALIASES[op] for op in ops})
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1

    def draw(rng: random.Random):
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        question = f"What is {a} {op} {b}? {ARITHMETIC_INSTRUCTION}"
        return f"{a}{op}{b}", {"prompt": _prompt(question, chat), "answer": str(value)}

    return _sample_unique(n, seed, split, draw, "arithmetic")


def _build_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction]:
    """A random expression using every number once (random order, random binary tree, + − × and exact ÷)."""
    items: list[tuple[str, Fraction]] = [(str(v), Fraction(v)) for v in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        (ea, va), (eb, vb) = items[i], items[i + 1]
        op = rng.choice("+-*/")
        if op == "/" and (vb == 0 or (va / vb).denominator != 1):
            op = rng.choice("+-*")
        value = va + vb if op == "+" else va - vb if op == "-" else va * vb if op == "*" else va / vb
        items[i : i + 2] = [(f"({ea} {op} {eb})", value)]
    expression, value = items[0]
    return expression[1:-1] if expression.startswith("(") else expression, value


def countdown_task(
    n: int,
    seed: int,
    n_numbers: int = 3,
    max_number: int = 25,
    max_target: int = 200,
    chat: bool = True,
    split: str | None = None,
) -> list[dict[str, Any]]:
    """``n`` distinct Countdown problems: reach ``target`` from ``numbers`` with + − × ÷.

    Numbers are drawn from 1..``max_number``; the target is the value of a random expression over all of them
    (so it is reachable by construction, the expression is kept in the ``expression`` column), kept when it is an
    integer in 1..``max_target`` other than one of the numbers. The reward rule (``countdown_reward``) allows any
    subset, each number at most once.
    """
    if n_numbers < 2:
        raise ValueError(f"n_numbers must be >= 2, got {n_numbers}")
    if max_number < 1 or max_target < 1:
        raise ValueError(f"max_number and max_target must be >= 1, got {max_number}, {max_target}")

    def draw(rng: random.Random):
        for _ in range(1000):
            numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
            expression, value = _build_expression(rng, numbers)
            if value.denominator == 1 and 1 <= value <= max_target and value not in numbers:  # not trivial
                break
        else:
            raise ValueError(f"no target in 1..{max_target} found for {n_numbers} numbers up to {max_number}")
        target = int(value)
        question = (f"Using the numbers {numbers}, create an expression that equals {target}. You may use +, -, *, / "
                    f"and parentheses, and each number at most once. {COUNTDOWN_INSTRUCTION}")  # fmt: skip
        key = f"{sorted(numbers)}->{target}"
        return key, {"prompt": _prompt(question, chat), "numbers": numbers, "target": target, "expression": expression}

    return _sample_unique(n, seed, split, draw, "countdown")


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (blank lines skipped); every row must be an object with a ``prompt`` column."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: each line must be a JSON object, got {type(row).__name__}")
            if "prompt" not in row:
                raise ValueError(f"{path}:{line_no}: missing required column 'prompt'; columns found: {sorted(row)}")
            rows.append(row)
    return rows


TASKS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "arithmetic": arithmetic_task,
    "countdown": countdown_task,
}


def get_task(name: str, n: int, seed: int = 0, split: str = "train", **kwargs) -> list[dict[str, Any]]:
    """``n`` examples of task ``name`` for ``split`` ("train" or "eval"); the splits never share a problem. The eval
    split draws from a seed derived from ``seed`` so its order is independent of train's."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {sorted(TASKS)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    derived = seed if split == "train" else seed + 1_000_003
    return TASKS[name](n, derived, split=split, **kwargs)


__all__ = ["ARITHMETIC_LEVELS", "EVAL_BUCKETS", "TASKS", "arithmetic_task", "countdown_task", "get_task", "load_jsonl"]
