"""Offline harness for TRL's own GRPO tests (``test_grpo_trainer.py``, copied from TRL with one import switched).

Runs only when ``GRPO_FAST_TRL_TARGET`` names a target (see target.py); otherwise the copied file is not collected,
so ``make test`` stays fast and the Hub stand-ins never leak into other tests.
``GRPO_FAST_TRL_SUBSET=ci`` keeps only ``CI_SUBSET``.

Offline: the Hub models the tests name are rebuilt in code into a hub cache (hub.py) that ``HF_HUB_CACHE`` points
at, with ``HF_HUB_OFFLINE=1``; ``load_dataset("trl-internal-testing/zen", ...)`` is answered by zen.py.

Selection: ``TestGRPOTrainer``'s tests that run on a CPU with text only. Every other test is deselected, by the
first rule that applies, and the terminal summary counts each reason:
1. another class: multimodal (``TestGRPOTrainerVLM``), GPU-only (``TestGRPOTrainerSlow``), or unit tests of TRL
   helpers that take no trainer (entropy mask, rollout dispatch, continuous-batching contract);
2. a test TRL itself skips here: its ``skip``/``skipif`` marks say why (vLLM server not mocked, liger-kernel or
   jmespath (tool calling) not installed);
3. ``HUB_ONLY``: tests that assert on properties only the Hub's own files have.
"""

from __future__ import annotations

import gc
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TARGET = os.environ.get("GRPO_FAST_TRL_TARGET")

if TARGET is None:
    collect_ignore = ["test_grpo_trainer.py"]
else:
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("tests/trl_compat must configure huggingface_hub before it is imported: run it in its own "
                           "pytest process (make test-trl)")
    sys.path.insert(0, str(HERE))
    import hub  # noqa: E402
    import zen  # noqa: E402
    from selection import CI_SUBSET, HUB_ONLY  # noqa: E402

    _cache = Path(os.environ.get("GRPO_FAST_TRL_HUB", Path.home() / ".cache" / "grpo_fast" / "trl_compat"))
    _root = _cache / hub.fingerprint()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      HF_HUB_CACHE=str(_root / "hub"), HF_MODULES_CACHE=str(_root / "modules"))
    hub.build_hub(_root / "hub")

    import torch  # noqa: E402

    # The models are tiny: with several threads per op, hand-offs between threads cost more than the math (a
    # test took 70 s with 2 threads on a loaded 2-core machine, 12 s with one).
    torch.set_num_threads(1)

    import datasets  # noqa: E402

    _load_dataset = datasets.load_dataset

    def _offline_load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if path == "trl-internal-testing/zen" and not args and not kwargs:
            return zen.load_zen(name, split=split, streaming=streaming)
        return _load_dataset(path, name, *args, split=split, streaming=streaming, **kwargs)

    # Rebound before the test module runs ``from datasets import load_dataset``, so the test file stays unchanged.
    datasets.load_dataset = _offline_load_dataset


def _deselect_reason(item) -> str | None:
    cls = item.cls.__name__ if item.cls is not None else None
    if cls != "TestGRPOTrainer":
        return f"not TestGRPOTrainer ({cls or 'module-level'})"
    for mark in item.iter_markers("skip"):
        return f"TRL skips it: {mark.kwargs.get('reason') or (mark.args or ['skip'])[0]}"
    for mark in item.iter_markers("skipif"):
        if mark.args and mark.args[0]:
            return f"TRL skips it: {mark.kwargs.get('reason', 'skipif')}"
    if item.originalname in HUB_ONLY:
        return f"Hub-only: {HUB_ONLY[item.originalname]}"
    return None


_deselected: Counter = Counter()


def pytest_collection_modifyitems(config, items):
    if TARGET is None:
        return
    subset = os.environ.get("GRPO_FAST_TRL_SUBSET")
    if subset not in (None, "", "ci"):
        raise pytest.UsageError(f"GRPO_FAST_TRL_SUBSET must be unset or 'ci'; got {subset!r}")
    keep, drop = [], []
    for item in items:
        reason = _deselect_reason(item)
        if reason is None and subset == "ci" and item.name not in CI_SUBSET:
            reason = "not in the CI subset"
        if reason is None:
            keep.append(item)
        else:
            drop.append(item)
            _deselected[reason] += 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter):
    if TARGET is None:
        return
    terminalreporter.write_sep("-", f"TRL GRPO tests on target {TARGET!r}: deselected by rule")
    for reason, count in sorted(_deselected.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{count:4d}  {reason}")


@pytest.fixture(autouse=True)
def _cpu_training_args(monkeypatch):
    """TRL configs default to bf16, which transformers refuses on a CPU unless ``use_cpu=True``; TRL's own conftest
    sets it the same way when no accelerator is present."""
    import torch

    if torch.cuda.is_available() or TARGET == "grpo_fast":
        return
    from trl.trainer.base_config import _BaseConfig

    post_init = _BaseConfig.__post_init__

    def cpu_post_init(self):
        self.use_cpu = True
        post_init(self)

    monkeypatch.setattr(_BaseConfig, "__post_init__", cpu_post_init)


@pytest.fixture(autouse=True)
def _collect_garbage():
    yield
    gc.collect()
