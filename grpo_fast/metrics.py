"""Where metrics go: ``metrics.jsonl`` in output_dir, a PNG of reward and entropy per step (matplotlib when
importable), and TensorBoard / W&B through their own libraries when asked for and installed (never required)."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; TRL logs None for a metric without valid values
    return value


class MetricsLog:
    def __init__(self, output_dir: str | Path, report_to: list[str] | None = None, enabled: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.history: list[dict] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        for name in report_to or []:
            if name == "tensorboard" and importable("torch.utils.tensorboard") and importable("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "runs"))
            elif name == "wandb" and importable("wandb"):
                import wandb

                self._wandb = wandb.run or wandb.init(dir=str(self.dir))
            elif name not in ("none", "tensorboard", "wandb"):
                warnings.warn(f"report_to={name!r} is not supported (supported: tensorboard, wandb); ignored")
            else:
                warnings.warn(f"report_to={name!r} asked for but its library is not installed; ignored")

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        return row

    def plot(self, keys=("reward", "entropy")) -> Path | None:
        """Writes ``metrics.png`` (one panel per key); returns its path, or None without matplotlib."""
        if not self.enabled or not importable("matplotlib"):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
        for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
            pts = [(r["step"], r[key]) for r in self.history if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3)
            ax.set_xlabel("step")
            ax.set_title(key)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.dir / "metrics.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def progress_bar(total: int, initial: int, enabled: bool = True):
    """A tqdm bar over optimizer steps (a silent stand-in on other ranks or without tqdm)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc="GRPO", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass
    return _NoProgress()


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, d):
        pass

    def close(self):
        pass
