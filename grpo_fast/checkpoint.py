"""Atomic checkpoints: ``output_dir/checkpoint-<step>`` holds the model in Hugging Face format (safetensors), the
tokenizer and generation config, optimizer, scheduler, RNG states and the data position.

A checkpoint is written into a hidden temp folder and renamed into place; ``trainer_state.json`` is written last
inside it, so a folder without it (a crash mid-save) is never taken as the latest.

The optimizer state is stored keyed by parameter name (``model.named_parameters()``), not by position, so the same
file restores a plain model, a data-parallel one or an FSDP2-sharded one (``torch.distributed.checkpoint``'s full
optimizer state dict uses the same names). Older checkpoints keyed by position still load.
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
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """``model_state`` / ``optimizer_state``: full state dicts gathered beforehand (FSDP2); by default the model's
    own and the optimizer's (converted to names)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        _plain_architectures(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer_state is None:
            optimizer_state = optimizer_state_by_name(model, optimizer.state_dict(), optimizer)
        torch.save(optimizer_state, tmp / "optimizer.pt")
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


def _plain_architectures(config_json: Path) -> None:
    """FSDP2 renames the model's class (``FSDPLlamaForCausalLM``); the saved config names the real one."""
    if not config_json.exists():
        return
    config = json.loads(config_json.read_text())
    archs = config.get("architectures") or []
    fixed = [a[len("FSDP"):] if a.startswith("FSDP") else a for a in archs]
    if fixed != archs:
        config["architectures"] = fixed
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _param_names(model, optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(model, state: dict, optimizer) -> dict:
    """``optimizer.state_dict()`` (keyed by position) → keyed by parameter name."""
    names = _param_names(model, optimizer)
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _position_keyed(state: dict) -> bool:
    """True for ``optimizer.state_dict()``'s own format (older checkpoints), False for the name-keyed one."""
    return all(isinstance(i, int) for g in state["param_groups"] for i in g["params"])


def optimizer_state_by_index(model, state: dict, optimizer) -> dict:
    """The inverse of ``optimizer_state_by_name`` for this model and optimizer; position-keyed input passes."""
    if _position_keyed(state):
        return state
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    missing = [n for g in state["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state names parameters this model lacks: {missing[:5]}")
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def load_training_state(path: Path, optimizer, scheduler, model, sharded: bool = False) -> dict:
    """Restores optimizer, scheduler and RNG states; returns the trainer state dict. ``sharded``: the model is
    FSDP2-sharded, and the full (name-keyed) optimizer state is scattered to the shards."""
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if _position_keyed(saved):
            saved = optimizer_state_by_name(model, saved, optimizer)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=saved,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optimizer_state_by_index(model, saved, optimizer))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
