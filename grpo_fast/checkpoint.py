"""Atomic checkpoints: ``output_dir/checkpoint-<step>`` holds the model in Hugging Face format (safetensors), the
tokenizer and generation config, optimizer, scheduler, RNG states and the data position.

A checkpoint is written into a hidden temp folder and renamed into place; ``trainer_state.json`` is written last
inside it, so a folder without it (a crash mid-save) is never taken as the latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def _complete(path: Path) -> bool:
    return (path / STATE_FILE).exists() and any(path.glob("*model*.safetensors"))  # adapter_model for PEFT


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and _complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    trainer_state: dict,
    save_total_limit: int | None = None,
    extra: dict | None = None,
) -> Path:
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        for name, obj in (extra or {}).items():  # e.g. the generation batch a mid-generation resume continues
            torch.save(obj, tmp / name)
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit is not None and save_total_limit > 0:
        for old in list_checkpoints(root)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(path: Path, optimizer, scheduler) -> dict:
    """Restores optimizer, scheduler and RNG states; returns the trainer state dict."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
