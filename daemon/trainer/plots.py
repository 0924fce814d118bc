"""loss.png for a published version: train and eval loss against the optimizer step.

matplotlib is imported here, lazily, and only its object API with the Agg canvas is used: no pyplot
global state, no display, nothing that cares which thread or process draws.
"""

from __future__ import annotations

import io
from pathlib import Path

from daemon import durable


def _xy(points) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for p in points or []:
        step, value = (p["step"], p["loss"] if "loss" in p else p.get("eval_loss")) if isinstance(p, dict) else p
        if value is not None and value == value:  # NaN-free: a diverged step would wreck the axis
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def _smooth(ys: list[float], weight: float) -> list[float]:
    out, avg = [], None
    for y in ys:
        avg = y if avg is None else weight * avg + (1 - weight) * y
        out.append(avg)
    return out


def plot_loss(train_points, eval_points, path, title: str) -> Path:
    """Points are [step, loss] pairs (or {"step", "loss"|"eval_loss"} dicts); writes the PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    tx, ty = _xy(train_points)
    ex, ey = _xy(eval_points)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(ty) > 50:  # many noisy steps: show them faintly, with a smoothed line on top
        ax.plot(tx, ty, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(tx, _smooth(ty, 0.9), color="tab:blue", linewidth=1.8, label="train (smoothed)")
    elif ty:
        ax.plot(tx, ty, color="tab:blue", linewidth=1.5, marker="." if len(ty) < 20 else None, label="train")
    if ey:
        ax.plot(ex, ey, color="tab:orange", linewidth=1.5, marker="o", markersize=4, label="eval")
    if not ty and not ey:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if ty or ey:
        ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    durable.write_bytes(path, buf.getvalue())
    return path
