"""What a step logs about its rollouts, and the curves a finished run draws from its TensorBoard events."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestra_jax.runlog import read_scalars

# The curves `plot_run` draws (tag, title); per-tool call rates are added from whatever tools the run logged.
CURVES = (
    ("rollout/accuracy", "accuracy"),
    ("reward/mean", "reward (mean)"),
    ("rollout/cost_usd", "cost per episode ($)"),
    ("rollout/tool_latency_s", "tool latency per episode (s)"),
)


def rollout_metrics(trajectories: Sequence[Any], rewards: np.ndarray, advantages: np.ndarray,
                    keep: np.ndarray) -> dict[str, float]:
    """Scalars over one step's trajectories: accuracy, reward, cost, latency, per-tool call rates, formats."""
    n = max(len(trajectories), 1)
    out = {
        "rollout/accuracy": float(np.mean([t.correct for t in trajectories])) if trajectories else 0.0,
        "rollout/cost_usd": float(np.mean([t.ledger.cost_usd for t in trajectories])) if trajectories else 0.0,
        "rollout/tool_latency_s": float(np.mean([t.ledger.tool_latency_s for t in trajectories])) if trajectories else 0.0,
        "rollout/policy_latency_s": float(np.mean([t.ledger.policy_latency_s for t in trajectories])) if trajectories else 0.0,
        "rollout/turns": float(np.mean([len(t.turns) for t in trajectories])) if trajectories else 0.0,
        "rollout/format_error_rate": sum(t.format_errors for t in trajectories) / max(sum(len(t.turns) for t in trajectories), 1),
        "rollout/answered": sum(t.has_valid_answer for t in trajectories) / n,
        "rollout/kept_fraction": float(np.mean(keep)) if len(keep) else 0.0,
        "reward/mean": float(np.mean(rewards)) if len(rewards) else 0.0,
        "reward/std": float(np.std(rewards)) if len(rewards) else 0.0,
        "reward/advantage_abs_mean": float(np.mean(np.abs(advantages))) if len(advantages) else 0.0,
    }
    names = sorted({name for t in trajectories for name in t.tool_names})
    for name in names:
        out[f"tools/{name}_calls_per_episode"] = sum(t.tool_counts.get(name, 0) for t in trajectories) / n
    return out


def plot_run(run_dir: str | os.PathLike, out_png: str | os.PathLike, *, smooth: int = 3) -> Path:
    """Draw accuracy, reward, cost, latency and per-tool call rates from a run's TensorBoard events to a PNG.

    `smooth` is a trailing moving-average window (1 = raw); the raw points are drawn faintly behind it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (Path(run_dir) / "tb").is_dir():
        raise FileNotFoundError(f"{run_dir}: no tb/ directory (not a run directory)")
    scalars = read_scalars(Path(run_dir) / "tb")
    if not scalars:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard scalars under tb/")
    tool_tags = sorted(t for t in scalars if t.startswith("tools/"))
    panels = [(tag, title) for tag, title in CURVES if tag in scalars] + [("__tools__", "tool calls per episode")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (tag, title) in zip(np.atleast_1d(axes), panels):
        series = [(t, scalars[t]) for t in tool_tags] if tag == "__tools__" else [(tag, scalars[tag])]
        for name, points in series:
            steps = np.array([p[0] for p in points])
            values = np.array([p[1] for p in points])
            label = name.removeprefix("tools/").removesuffix("_calls_per_episode")
            line = ax.plot(steps, _moving_average(values, smooth), label=label)[0]
            if smooth > 1:
                ax.plot(steps, values, color=line.get_color(), alpha=0.25)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if tag == "__tools__":
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def curve_summary(run_dir: str | os.PathLike, span: int = 10) -> list[str]:
    """One line per curve: its mean over the first and the last `span` RL steps, so a trend can be read (and
    quoted) without the picture; single steps of a small run are too noisy to compare."""
    scalars = read_scalars(Path(run_dir) / "tb")
    tags = [tag for tag, _ in CURVES if tag in scalars] + sorted(t for t in scalars if t.startswith("tools/"))
    lines = []
    for tag in tags:
        values = np.array([value for _, value in sorted(scalars[tag])])
        n = min(span, len(values))
        lines.append(f"{tag}: first {n} steps {values[:n].mean():.6g}, last {n} steps {values[-n:].mean():.6g} "
                     f"({len(values)} steps)")
    return lines


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    out = np.empty(len(values))
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (cumulative[i + 1] - cumulative[lo]) / (i + 1 - lo)
    return out
