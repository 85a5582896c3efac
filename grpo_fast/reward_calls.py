"""Reward functions that cannot take a run down: ``guard_reward_func`` wraps one of TRL's reward callables
(``f(prompts, completions, **kwargs) -> list[float | None]``, sync or async) with a time-out and crash isolation.

A call that raises or runs past ``timeout`` seconds returns ``None`` for every completion (TRL turns ``None`` into
NaN: unscored, left out of the rewards' nan-aware sums) with a warning; a value that is not a number becomes
``None`` too. Each call logs ``rewards/<name>/failures`` (unusable values in the batch) through TRL's ``log_metric``.
A list of the wrong length is a bug in the function, not a bad sample: TRL raises on it, unchanged.
Reward models (``nn.Module``) are not wrapped.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import warnings


def guard_reward_func(func, name: str, timeout: float | None, isolate: bool = True):
    """``func`` with the time-out and crash isolation above; keeps its name and whether it is async.
    ``isolate=False``: exceptions and time-outs (``TimeoutError``) propagate, as in TRL."""

    def fail(n: int, why: str):
        warnings.warn(f"reward function {name!r} {why}; its {n} rewards in this batch are unscored", stacklevel=3)
        return [None] * n

    def clean(result, n: int, kwargs):
        result = list(result)
        out = [r if r is None or _is_number(r) else None for r in result]
        bad = sum(o is None and r is not None for o, r in zip(out, result))
        if bad:
            warnings.warn(f"reward function {name!r} returned {bad} values that are not numbers; they are unscored",
                          stacklevel=3)
        report(kwargs, bad)
        return out

    def report(kwargs, n):
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric(f"rewards/{name}/failures", float(n))

    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):

        @functools.wraps(func)
        async def guarded_async(*args, **kwargs):
            n = len(kwargs.get("prompts", args[0] if args else ()))
            try:
                result = await asyncio.wait_for(func(*args, **kwargs), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                if not isolate:
                    raise TimeoutError(f"reward function {name!r} exceeded reward_timeout={timeout}s") from None
                report(kwargs, n)
                return fail(n, f"exceeded reward_timeout={timeout}s")
            except Exception as e:  # noqa: BLE001 - a crashing verifier must not end a long run
                if not isolate:
                    raise
                report(kwargs, n)
                return fail(n, f"raised {type(e).__name__}: {e}")
            return clean(result, n, kwargs)

        return guarded_async

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        n = len(kwargs.get("prompts", args[0] if args else ()))
        try:
            result = func(*args, **kwargs) if timeout is None else _call_with_timeout(func, timeout, args, kwargs)
        except TimeoutError:
            if not isolate:
                raise TimeoutError(f"reward function {name!r} exceeded reward_timeout={timeout}s") from None
            report(kwargs, n)
            return fail(n, f"exceeded reward_timeout={timeout}s")
        except Exception as e:  # noqa: BLE001 - a crashing verifier must not end a long run
            if not isolate:
                raise
            report(kwargs, n)
            return fail(n, f"raised {type(e).__name__}: {e}")
        return clean(result, n, kwargs)

    return guarded


def _is_number(value) -> bool:
    """A real number, or a tensor / numpy scalar holding one (what TRL's ``torch.tensor`` accepts)."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def _call_with_timeout(func, timeout: float, args, kwargs):
    """Runs ``func`` in a daemon thread; a call still running after ``timeout`` seconds is abandoned (a Python
    thread cannot be killed) and raises TimeoutError, so a hung verifier cannot stall or block the run's exit."""
    box: dict = {}

    def target():
        try:
            box["result"] = func(*args, **kwargs)
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
