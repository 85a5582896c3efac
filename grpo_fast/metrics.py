"""The run's picture: ``PlotCallback`` writes ``metrics.png`` (reward and entropy per logged step, from the trainer's
``state.log_history``) to ``output_dir`` when training ends. Logging itself is transformers' (``report_to``,
``trainer_state.json`` in each checkpoint)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from transformers import TrainerCallback

PLOT_KEYS = ("reward", "entropy")


def plot_log_history(log_history: list[dict], path: str | Path, keys=PLOT_KEYS) -> Path | None:
    """One panel per key of ``keys`` against the step; returns the PNG's path, or None without matplotlib or data."""
    series = {k: [(e["step"], e[k]) for e in log_history if isinstance(e.get(k), (int, float))
                  and math.isfinite(e[k]) and "step" in e] for k in keys}
    if importlib.util.find_spec("matplotlib") is None or not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        if series[key]:
            ax.plot(*zip(*series[key]), marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class PlotCallback(TrainerCallback):
    """``metrics.png`` in ``args.output_dir`` at the end of training (main process only)."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_log_history(state.log_history, Path(args.output_dir) / "metrics.png")
