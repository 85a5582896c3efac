"""Built-in reward functions with TRL's calling convention: ``f(prompts, completions, **kwargs) -> list[float | None]``.

``completions`` are strings or chat message lists (``[{"role": "assistant", "content": ...}]``); ``kwargs`` carry the
dataset columns (``answer``, ``numbers``, ``target`` ...), ``completion_ids`` and ``trainer_state``. ``None`` means
"not scored" (TRL turns it into NaN and leaves it out of the statistics). Metric names are
``rewards/<func.__name__>/...``, so names follow TRL where TRL has the same function (``accuracy_reward``,
``soft_overlong_punishment_reward``).

Deliberate simplifications: answers are compared numerically (exact rationals, relative tolerance 1e-6 for
decimals) or as normalized strings; there is no symbolic (sympy / math_verify) equivalence.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "Answer: X", "**Answer:** X", "Final answer: X" (a delimited answer) and the looser "the answer is X".
_ANSWER_COLON = re.compile(r"answer\s*\**\s*[:：]\s*\**", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*", re.IGNORECASE)
_LATEX_FRAC = r"-?\\[dt]?frac\s*\{\s*-?\d+\s*\}\s*\{\s*-?\d+\s*\}"
_PLAIN_NUMBER = r"(?:(?<![\w)\]}.])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+)(?![\d])"
_NUMBER = re.compile(rf"{_LATEX_FRAC}|{_PLAIN_NUMBER}")
_FRAC_PARTS = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")
_REL_TOL = 1e-6


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: the string itself, or the content of the last assistant message of a chat."""
    if isinstance(completion, str):
        return completion
    messages = [m for m in completion if m.get("role", "assistant") == "assistant"] or list(completion)
    if not messages:
        return ""
    content = messages[-1].get("content") or ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` (braces may nest)."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def _answer_span(text: str, loose: bool = True) -> str | None:
    """The delimited final answer: last \\boxed{}, else last <answer></answer>, else the rest of the line after the
    last "Answer:" (or, when ``loose``, "answer is")."""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    markers = list(_ANSWER_COLON.finditer(text))
    if loose:
        markers += list(_ANSWER_IS.finditer(text))
    for marker in sorted(markers, key=lambda m: m.end(), reverse=True):
        line = text[marker.end() :].split("\n", 1)[0]
        span = line.strip().strip("*$ ").rstrip(".").strip()
        if span:
            return span
    return None


def _normalize_number(token: str) -> str:
    frac = _FRAC_PARTS.fullmatch(token.strip())
    if frac:
        sign, num, den = frac.groups()
        return f"{sign}{num}/{den}".replace("--", "")
    return re.sub(r"\s+", "", token).replace(",", "")


def extract_answer(text: str) -> str | None:
    """Final answer of a completion as a string, or None.

    Order: the last ``\\boxed{...}`` (nested braces), else ``<answer>...</answer>``, else what follows the last
    "Answer:" / "answer is", else the last number in the text. A span that is a number followed only by words
    (units) or punctuation is reduced to that number; "... = 85" keeps the right side. Numbers are normalized:
    thousands separators dropped (``1,234`` → ``1234``), unicode minus → ``-``, ``\\frac{a}{b}`` → ``a/b``;
    negatives, decimals and ``a/b`` fractions are kept as written.
    """
    text = completion_text(text).replace("\u2212", "-")
    span = _answer_span(text)
    if span is not None:
        span = span.replace("\\!", "").replace("\\,", "")
        span = re.sub(r"^\\text\{([^{}]*)\}$", r"\1", span).strip()
        if "=" in span and span.rsplit("=", 1)[1].strip():
            span = span.rsplit("=", 1)[1].strip()  # "47 + 38 = 85" → "85"
        lead = _NUMBER.match(span.lstrip("$ "))
        # "85", "85 apples", "85." reduce to the number; "2^{10}" or "47 + 38" stay whole.
        if lead and re.fullmatch(r"\s*(?:[.,;!]|\s[^\d+\-*/^=].*)?", span.lstrip("$ ")[lead.end() :], re.DOTALL):
            return _normalize_number(lead.group(0))
        return span
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def _to_fraction(s: str) -> Fraction | None:
    s = _normalize_number(s.strip().strip("$").replace("\u2212", "-")).rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    try:
        value = Fraction(s)  # "3", "-0.75", "3/4", "1e3"
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _normalize_text(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return re.sub(r"[\s$]", "", s).rstrip(".").lower()


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when ``pred`` equals ``gold``: as numbers when both parse (exact rationals, relative tolerance 1e-6 when
    either is a decimal), else as strings (case, spaces, ``$`` and a final period ignored)."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    a, b = _to_fraction(pred), _to_fraction(gold)
    if a is not None and b is not None:
        if a == b:
            return True
        if "." in pred or "." in gold:
            return abs(a - b) <= _REL_TOL * max(1, abs(b))
        return False
    return _normalize_text(pred) == _normalize_text(gold)


def accuracy_reward(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the extracted final answer matches the gold one, else 0.0; None where the gold answer is missing.

    The gold answer comes from the ``answer`` column (or TRL's ``solution`` column) and is itself passed through
    ``extract_answer`` when it is not a bare answer (e.g. GSM8K's ``#### 42``).
    """
    gold = answer if answer is not None else solution
    if gold is None:
        raise ValueError("accuracy_reward needs an 'answer' (or 'solution') dataset column")
    if len(gold) != len(completions):
        raise ValueError(f"accuracy_reward got {len(completions)} completions but {len(gold)} answers")
    rewards: list[float | None] = []
    for completion, ref in zip(completions, gold, strict=True):
        if ref is None or not str(ref).strip():
            rewards.append(None)
            continue
        ref = str(ref).split("####")[-1].strip()
        ref_answer = ref if _to_fraction(ref) is not None else (extract_answer(ref) or ref)
        rewards.append(1.0 if answers_match(extract_answer(completion_text(completion)), ref_answer) else 0.0)
    return rewards


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion delimits its final answer clearly (a non-empty ``\\boxed{}``, ``<answer>...</answer>``
    or an "Answer: ..." line), else 0.0. The loose "the answer is X" does not count."""
    return [1.0 if _answer_span(completion_text(c), loose=False) is not None else 0.0 for c in completions]


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (eq. 13), TRL's ``get_soft_overlong_punishment`` semantics on the number of
    completion tokens |y|: 0 when |y| ≤ L_max − L_cache, (L_max − L_cache − |y|) / L_cache up to L_max, −1 beyond.
    A class (not a closure) so it pickles; ``__name__`` is TRL's, so the metric keys agree."""

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if max_completion_len < 1 or not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                f"need max_completion_len >= 1 and 0 <= soft_punish_cache <= max_completion_len, got "
                f"max_completion_len={max_completion_len}, soft_punish_cache={soft_punish_cache}"
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("soft_overlong_punishment_reward needs completion_ids (token ids of each completion)")
        free = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= free:
                rewards.append(0.0)
            elif length <= self.max_completion_len:
                rewards.append((free - length) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> SoftOverlongPunishment:
    """Factory with TRL's name and arguments; see ``SoftOverlongPunishment``."""
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


_MAX_EXPRESSION_CHARS = 200
_MAX_EXPRESSION_NODES = 100
_BINOPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def safe_eval_arithmetic(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value of an arithmetic expression and the integer literals it uses, or None when it is not one.

    Walks Python's ``ast`` and accepts only integer literals, binary + − × ÷, unary ±, and parentheses (which the
    parser folds away); anything else (names, calls, attributes, ``**``, ``//``, floats, strings, comparisons)
    is refused. Arithmetic is exact (``Fraction``); division by zero gives None. Length and node-count caps keep
    hostile inputs cheap. ``×``, ``÷`` and unicode minus are accepted as ``*``, ``/`` and ``-``. Never ``eval``.
    """
    if not isinstance(expression, str) or len(expression) > _MAX_EXPRESSION_CHARS:
        return None
    expression = expression.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-").strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if sum(1 for _ in ast.walk(tree)) > _MAX_EXPRESSION_NODES:
        return None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    try:
        return walk(tree.body), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def _countdown_expression(text: str) -> str | None:
    span = _answer_span(text)
    if span is None:
        return None
    span = span.replace("\\times", "*").replace("\\div", "/").replace("\\cdot", "*").strip("$ ")
    return span.split("=")[0].strip()  # "(3 + 5) * 2 = 16" → the left side


def countdown_reward(prompts, completions, numbers=None, target=None, **kwargs) -> list[float | None]:
    """1.0 when the final answer is an arithmetic expression over the given ``numbers`` that equals ``target``.

    The rule: the expression may use any subset of the numbers, each at most as many times as it is given (not
    necessarily all of them); only + − × ÷ and parentheses (see ``safe_eval_arithmetic``). A malformed or unsafe
    expression, a division by zero or a missing answer gives 0.0; a row without numbers/target gives None.
    """
    if numbers is None or target is None:
        raise ValueError("countdown_reward needs 'numbers' and 'target' dataset columns")
    rewards: list[float | None] = []
    for completion, nums, tgt in zip(completions, numbers, target, strict=True):
        if nums is None or tgt is None:
            rewards.append(None)
            continue
        expression = _countdown_expression(completion_text(completion).replace("\u2212", "-"))
        result = safe_eval_arithmetic(expression) if expression else None
        if result is None:
            rewards.append(0.0)
            continue
        value, used = result
        available = Counter(int(v) for v in nums)
        ok = not (Counter(used) - available) and value == Fraction(int(tgt))
        rewards.append(1.0 if ok else 0.0)
    return rewards


REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "countdown": countdown_reward,
}


def get_reward_funcs(names: str | Sequence[str]) -> list[Callable[..., list[float | None]]]:
    """Reward functions by registry name; ``names`` is a list or a comma-separated string."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; valid names: {sorted(REWARD_FUNCS)}")
    if not names:
        raise ValueError(f"no reward function named; valid names: {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[n] for n in names]


__all__ = [
    "REWARD_FUNCS",
    "SoftOverlongPunishment",
    "accuracy_reward",
    "answers_match",
    "completion_text",
    "countdown_reward",
    "extract_answer",
    "format_reward",
    "get_reward_funcs",
    "get_soft_overlong_punishment",
    "safe_eval_arithmetic",
]
