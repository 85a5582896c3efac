"""Calling reward functions: the signature check at construction, and at each step one call per function with
time-outs and crash isolation, so a bad verifier costs its rewards (unscored, counted), never the run.

A reward function is TRL's: ``f(prompts, completions, **kwargs) -> list[float | None]`` with the dataset's other
columns, ``completion_ids`` and ``trainer_state`` as keywords; ``None`` means unscored. Names from
``grpo_fast.rewards`` (strings) resolve to the built-in verifiers.
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings

import torch

from grpo_fast.data import is_conversational


def reward_func_name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def check_reward_signature(func) -> None:
    """Fails at construction, not at step 50: a reward function must accept prompts=, completions= and **kwargs."""
    if not callable(func):
        raise TypeError(f"reward function {func!r} is not callable")
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [n for n in ("prompts", "completions") if n not in params and not has_var_kw]
    if missing or not has_var_kw:
        raise TypeError(
            f"reward function {reward_func_name(func)!r} must have the signature "
            f"f(prompts, completions, **kwargs) -> list[float | None]; "
            f"got {inspect.signature(func)}" + (f" (missing {missing})" if missing else " (no **kwargs)")
        )


def resolve_reward_funcs(reward_funcs) -> list:
    """One function, a name of a built-in verifier, or a list of them → a list of checked callables."""
    from grpo_fast.rewards import get_reward_funcs

    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty: give at least one reward function")
    out = []
    for f in funcs:
        if isinstance(f, str):
            out += get_reward_funcs([f])
        elif isinstance(f, torch.nn.Module):
            raise TypeError("reward models (nn.Module) are not supported; pass f(prompts, completions, **kwargs)")
        else:
            check_reward_signature(f)
            out.append(f)
    return out


def score(funcs: list, names: list[str], rows: list[dict], out, group_size: int, timeout: float | None,
          step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards ``[N, R]`` on the CPU (NaN = unscored) for the sampler's output ``out`` on ``rows`` (each repeated
    ``group_size`` times), and the count of unusable values per function (``rewards/<name>/failures``)."""
    prompts = [r["prompt"] for r in rows for _ in range(group_size)]
    conversational = is_conversational(rows[0]["prompt"])
    texts = out.texts
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
    ids_list = [ids[m.bool()].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)]
    columns = {k: [r[k] for r in rows for _ in range(group_size)] for k in rows[0] if k != "prompt"}
    kwargs = dict(columns, completion_ids=ids_list, trainer_state={"global_step": step})
    n = len(prompts)
    rewards = torch.full((n, len(funcs)), float("nan"))
    counters: dict[str, float] = {}
    for i, (func, name) in enumerate(zip(funcs, names)):
        values, failed = call_reward(func, name, prompts, completions, kwargs, timeout)
        rewards[:, i] = torch.tensor(values, dtype=torch.float32)
        counters[f"rewards/{name}/failures"] = float(failed)
    return rewards, counters


def call_reward(func, name: str, prompts: list, completions: list, kwargs: dict,
                timeout: float | None) -> tuple[list[float], int]:
    """Calls one reward function; exceptions, time-outs and non-numbers become NaN (unscored) and are counted.
    A list of the wrong length is a bug in the function, not a bad sample: it raises."""
    n = len(prompts)
    try:
        if timeout is None:
            result = func(prompts=prompts, completions=completions, **kwargs)
        else:
            result = _call_with_timeout(func, timeout, prompts=prompts, completions=completions, **kwargs)
    except TimeoutError:
        warnings.warn(f"reward function {name!r} exceeded reward_timeout={timeout}s; its rewards are unscored")
        return [math.nan] * n, n
    except Exception as e:  # noqa: BLE001 — a crashing verifier must not kill a long run
        warnings.warn(f"reward function {name!r} raised {type(e).__name__}: {e}; its rewards are unscored")
        return [math.nan] * n, n
    result = list(result)
    if len(result) != n:
        raise ValueError(
            f"reward function {name!r} returned {len(result)} rewards, but {n} were expected "
            "(one per prompt-completion pair)"
        )
    values, failed = [], 0
    for r in result:
        if r is None:
            values.append(math.nan)
            continue
        try:
            v = float(r)
        except (TypeError, ValueError):
            v, failed = math.nan, failed + 1
        values.append(v)
    return values, failed


def _call_with_timeout(func, timeout: float, **kwargs):
    """Runs ``func`` in a daemon thread; a call still running after ``timeout`` seconds is abandoned (a Python
    thread cannot be killed) and raises TimeoutError, so a hung verifier cannot stall or block the run's exit."""
    box: dict = {}

    def target():
        try:
            box["result"] = func(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["result"]
