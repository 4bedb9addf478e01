"""Evaluation plots (PNG): accuracy vs cost with its Pareto front, and accuracy and cost vs turn limit."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (cost, accuracy) not dominated by a cheaper-or-equal, at-least-as-accurate other point."""
    front = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


def plot_pareto(summaries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Each run label is a point (mean cost $, accuracy) with its 95% interval; the front is a step line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = []
    for label, s in summaries.items():
        cost, acc = s["cost_usd_mean"], s["accuracy"]
        low, high = s["accuracy_ci95"]
        ax.errorbar(cost, acc, yerr=[[max(0.0, acc - low)], [max(0.0, high - acc)]], fmt="o", capsize=3)
        ax.annotate(label, (cost, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
        points.append((cost, acc))
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([c for c, _ in front], [a for _, a in front], where="post", linestyle="--", color="grey", label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xlabel("mean cost per task (USD)")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "accuracy vs cost")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_turn_sweep(summaries_by_turns: Mapping[int, Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy with its 95% interval (left axis, 0 to 1) and mean cost (right axis, from 0) against the turn limit."""
    turns = sorted(summaries_by_turns)
    accuracy = [summaries_by_turns[t]["accuracy"] for t in turns]
    low = [max(0.0, a - summaries_by_turns[t]["accuracy_ci95"][0]) for t, a in zip(turns, accuracy)]
    high = [max(0.0, summaries_by_turns[t]["accuracy_ci95"][1] - a) for t, a in zip(turns, accuracy)]
    cost = [summaries_by_turns[t]["cost_usd_mean"] for t in turns]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.errorbar(turns, accuracy, yerr=[low, high], fmt="o-", capsize=3, color="tab:blue", label="accuracy (95% CI)")
    ax.set_xlabel("turn limit")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(turns)
    ax2 = ax.twinx()
    ax2.plot(turns, cost, "s--", color="tab:red", label="mean cost")
    ax2.set_ylabel("mean cost per task (USD)", color="tab:red")
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
    ax2.set_ylim(bottom=0, top=max(cost) * 1.15 if max(cost) > 0 else 1e-6)
    ax.set_title(title or "accuracy and cost vs turn limit")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
