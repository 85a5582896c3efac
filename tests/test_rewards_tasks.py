"""Reward functions (answer extraction, matching, safe Countdown evaluator, overlong penalty vs TRL) and tasks."""

from __future__ import annotations

import json
import pickle

import pytest

from grpo_fast.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    answers_match,
    countdown_reward,
    extract_answer,
    format_reward,
    get_reward_funcs,
    get_soft_overlong_punishment,
    safe_eval_arithmetic,
)
from grpo_fast.tasks import TASKS, arithmetic_task, countdown_task, get_task, load_jsonl


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The total is 1,234 apples.", "1234"),
        ("Answer: 1,234,567", "1234567"),
        ("so we get -17", "-17"),
        ("Answer: \u221242", "-42"),  # unicode minus
        ("x = 8-5, so 3", "3"),  # a hyphen between numbers is no sign
        ("Answer: 0.75", "0.75"),
        ("Answer: 3/4", "3/4"),
        (r"We get \boxed{\frac{3}{4}}", "3/4"),
        (r"\boxed{-\dfrac{1}{2}}", "-1/2"),
        (r"first \boxed{1} then \boxed{2}, finally \boxed{7}", "7"),
        (r"\boxed{\text{{nested}} {braces}}", r"\text{{nested}} {braces}"),
        (r"\boxed{ 12 }", "12"),
        (r"\boxed{2^{10}}", "2^{10}"),
        ("Answer: 85 apples.", "85"),
        ("Answer: $1,234.", "1234"),
        ("**Answer:** 85", "85"),
        ("The answer is 42.", "42"),
        ("Answer: 47 + 38 = 85", "85"),
        ("<think>maybe 3</think><answer>5</answer>", "5"),
        ("Answer: Paris", "Paris"),
        ("no digits at all", None),
        ("", None),
        (r"\boxed{unclosed 5", "5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("85", "85", True),
        ("85.0", "85", True),
        ("1,234", "1234", True),
        ("0.5", "1/2", True),
        ("3/4", r"\frac{3}{4}", True),
        ("0.333333", "1/3", True),  # decimals get a 1e-6 relative tolerance
        ("0.33", "1/3", False),
        ("86", "85", False),
        ("-5", "5", False),
        ("paris", "Paris", True),
        (None, "1", False),
        ("1", None, False),
    ],
)
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_accuracy_reward_strings_chat_and_none():
    completions = [
        "Answer: 1,234",
        [{"role": "assistant", "content": r"so \boxed{-7}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "Answer: 3/4"}]}],
        "I don't know",
        "Answer: 5",
        "Answer: 42",
    ]
    answers = ["1234", "-7", "0.75", "3", None, "#### 42"]
    assert accuracy_reward(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, None, 1.0]
    assert accuracy_reward(prompts=None, completions=["Answer: 2"], solution=["2"]) == [1.0]  # TRL's column name
    assert accuracy_reward.__name__ == "accuracy_reward"
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(None, ["1"])


def test_format_reward():
    completions = ["Answer: 12", r"\boxed{3}", "the answer is 12", "12", r"\boxed{}", "Answer:", "<answer>x</answer>",
                   [{"role": "assistant", "content": "reasoning...\nAnswer: -4"}]]  # fmt: skip
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_soft_overlong_punishment_matches_trl():
    ours = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    lengths = [0, 1, 79, 80, 81, 90, 99, 100, 101, 500]
    ids = [[1] * n for n in lengths]
    expected = [0.0, 0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert ours(prompts=None, completions=None, completion_ids=ids) == pytest.approx(expected, abs=1e-12)
    trl_rewards = pytest.importorskip("trl.rewards")
    for max_len, cache in [(100, 20), (16, 16), (10, 0), (7, 3)]:
        ref = trl_rewards.get_soft_overlong_punishment(max_len, cache)
        ids = [[0] * n for n in range(0, max_len + 3)]
        mine = get_soft_overlong_punishment(max_len, cache)
        assert mine(completion_ids=ids) == ref(completion_ids=ids)
        assert mine.__name__ == ref.__name__
    pickle.dumps(ours)  # picklable, like TRL's class
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(10, 11)
    with pytest.raises(ValueError, match="completion_ids"):
        ours(prompts=None, completions=["x"])


@pytest.mark.parametrize(
    "expr,value,used",
    [
        ("(3 + 5) * 2", 16, [3, 5, 2]),
        ("10 / 4", 2.5, [10, 4]),
        ("-3 + 7", 4, [3, 7]),
        ("2 \u00d7 6 \u00f7 3", 4, [2, 6, 3]),
        ("((((1))))", 1, [1]),
    ],
)
def test_safe_eval_accepts_arithmetic(expr, value, used):
    got, got_used = safe_eval_arithmetic(expr)
    assert float(got) == value and got_used == used


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd')",
        "x + 1",
        "(1).real",
        "2 ** 3",
        "9 ** 9 ** 9 ** 9",
        "10 // 3",
        "10 % 3",
        "1.5 + 2",
        "'a' * 3",
        "[1, 2]",
        "1 if 1 else 2",
        "lambda: 1",
        "1 < 2",
        "3 / 0",
        "5 / (2 - 2)",
        "(" * 300 + "1" + ")" * 300,
        "1 +",
        "True + 1",
    ],
)
def test_safe_eval_rejects(expr):
    assert safe_eval_arithmetic(expr) is None


def test_countdown_reward():
    numbers = [[3, 5, 2, 7]] * 8 + [None]
    target = [16] * 8 + [None]
    completions = [
        "Answer: (3 + 5) * 2",  # a subset is allowed
        r"\boxed{(3 + 5) \times 2}",
        "Answer: (3 + 5) * 2 = 16",
        "Answer: (3 + 3) * 2 + 4",  # 3 used twice, 4 not given
        "Answer: 2 ** 4",  # power refused
        "Answer: (3 + 5) / (7 - 7) * 2",  # division by zero: 0, no crash
        "Answer: 16",  # 16 is not one of the numbers
        [{"role": "assistant", "content": "Answer: 7 * 2 + 5 - 3"}],
        "Answer: 1",
    ]
    assert countdown_reward(None, completions, numbers=numbers, target=target) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0,
                                                                                    0.0, 1.0, None]  # fmt: skip
    assert countdown_reward(None, ["no answer here"], numbers=[[1, 2]], target=[3]) == [0.0]
    assert countdown_reward(None, ["Answer: 2 + 2"], numbers=[[2, 2]], target=[4]) == [1.0]  # duplicates given twice


def test_registry():
    funcs = get_reward_funcs("accuracy,format")
    assert funcs == [REWARD_FUNCS["accuracy"], REWARD_FUNCS["format"]]
    assert get_reward_funcs(["countdown"]) == [countdown_reward]
    with pytest.raises(ValueError, match="valid names: .*accuracy"):
        get_reward_funcs(["accuracy", "nope"])


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_arithmetic_answers_correct(level):
    for ex in arithmetic_task(50, seed=level, level=level):
        question = ex["prompt"][0]["content"]
        a, op, b = question.removeprefix("What is ").split("?")[0].split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert ex["answer"] == str(expected)
        assert ex["prompt"][0]["role"] == "user" and "Answer: <number>" in question
        assert accuracy_reward(None, [f"Answer: {ex['answer']}"], answer=[ex["answer"]]) == [1.0]


def test_arithmetic_options_and_errors():
    plain = arithmetic_task(5, seed=0, digits=3, ops=("\u00d7",), chat=False)
    assert all(isinstance(ex["prompt"], str) and " * " in ex["prompt"] for ex in plain)
    assert all(99 < int(ex["prompt"].split()[2]) < 1000 for ex in plain)
    with pytest.raises(ValueError, match="distinct"):
        arithmetic_task(500, seed=0, digits=1, ops=("+",))  # only 100 problems exist
    with pytest.raises(ValueError, match="ops"):
        arithmetic_task(5, seed=0, ops=("^",))
    with pytest.raises(ValueError, match="level"):
        arithmetic_task(5, seed=0, level=9)


def test_countdown_task_reachable():
    for n_numbers in (3, 4):
        rows = countdown_task(40, seed=n_numbers, n_numbers=n_numbers)
        assert len({(tuple(sorted(r["numbers"])), r["target"]) for r in rows}) == 40
        for r in rows:
            assert len(r["numbers"]) == n_numbers and 1 <= r["target"] <= 200 and r["target"] not in r["numbers"]
            assert str(r["numbers"]) in r["prompt"][0]["content"]
        completions = [f"Answer: {r['expression']}" for r in rows]
        rewards = countdown_reward(None, completions, numbers=[r["numbers"] for r in rows],
                                   target=[r["target"] for r in rows])  # fmt: skip
        assert rewards == [1.0] * 40


@pytest.mark.parametrize("name,kw", [("arithmetic", {"digits": 1, "ops": ("+", "-")}), ("countdown", {})])
def test_get_task_reproducible_and_disjoint(name, kw):
    train = get_task(name, 150, seed=7, split="train", **kw)
    assert train == get_task(name, 150, seed=7, split="train", **kw)
    assert train != get_task(name, 150, seed=8, split="train", **kw)
    key = (lambda ex: ex["prompt"][0]["content"]) if name == "arithmetic" else (
        lambda ex: (tuple(sorted(ex["numbers"])), ex["target"]))  # fmt: skip
    train_keys = {key(ex) for seed in (7, 8, 9) for ex in get_task(name, 150, seed=seed, split="train", **kw)}
    eval_keys = {key(ex) for seed in (7, 8) for ex in get_task(name, 15, seed=seed, split="eval", **kw)}
    assert len(eval_keys) >= 15
    assert not train_keys & eval_keys


def test_get_task_errors():
    with pytest.raises(ValueError, match="valid names: .*arithmetic"):
        get_task("sudoku", 3)
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic", 3, split="test")
    assert set(TASKS) == {"arithmetic", "countdown"}


def test_load_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n\n" + json.dumps({"prompt": "yo"}) + "\n")
    assert load_jsonl(good) == [{"prompt": "hi", "answer": "1"}, {"prompt": "yo"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing required column 'prompt'; columns found: \['answer', "):
        load_jsonl(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_jsonl(broken)
