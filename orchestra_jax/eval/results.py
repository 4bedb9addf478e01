"""Per-example results (`results.jsonl`), their summary (`summary.json`, a Markdown table).

Rows are appended and flushed one at a time, so a killed run loses at most the example in flight, and a rerun
skips every id already written. An example that could not be run (an unreachable endpoint) is recorded with
`status: "error"`: it counts neither as right nor as wrong.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExampleResult:
    id: str
    correct: bool
    cost_usd: float
    latency_s: float
    turns: int
    tool_calls: dict[str, int] = field(default_factory=dict)
    trajectory_id: str = ""
    answer: str | None = None
    judge_method: str = ""
    judge_error: str | None = None
    judge_cost_usd: float = 0.0
    policy_latency_s: float = 0.0
    status: str = "ok"
    error: str | None = None
    max_turns: int | None = None
    run: str = ""
    """The run label (a policy, preference and turn limit) this row belongs to; one results file holds many."""
    group: str = ""
    """The curve of a turn-limit sweep: runs that differ only in `max_turns` share it."""
    finish_reason: str = ""
    trial: int = 0
    """Which of the k episodes of this (run, example) it is, when the run plays several (pass^k)."""


class ResultsFile:
    """Append-only JSONL of ExampleResult rows; reading tolerates a torn last line from a killed run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[ExampleResult]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(ExampleResult(**json.loads(line)))
            except (ValueError, TypeError):
                continue  # a torn line from a killed run: that example simply runs again
        return rows

    def done_ids(self) -> set[str]:
        return {r.id for r in self.read() if r.status == "ok"}

    def append(self, result: ExampleResult) -> None:
        self._repair_torn_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _repair_torn_tail(self) -> None:
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; (0, 0) when n = 0."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # rounding never excludes p


def summarize(results: Iterable[ExampleResult]) -> dict[str, Any]:
    """Accuracy with a 95% interval, cost (mean, total), latency, tool use, judge cost; errors apart."""
    results = list(results)
    scored = [r for r in results if r.status == "ok"]
    n = len(scored)
    correct = sum(r.correct for r in scored)
    low, high = wilson_interval(correct, n)
    calls: Counter[str] = Counter()
    for r in scored:
        calls.update(r.tool_calls)
    total_calls = sum(calls.values())
    return {
        "examples": len(results),
        "scored": n,
        "errors": len(results) - n,
        "judge_errors": sum(r.judge_error is not None for r in scored),
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [low, high],
        "cost_usd_mean": sum(r.cost_usd for r in scored) / n if n else 0.0,
        "cost_usd_total": sum(r.cost_usd for r in scored),
        "latency_s_mean": sum(r.latency_s for r in scored) / n if n else 0.0,
        "turns_mean": sum(r.turns for r in scored) / n if n else 0.0,
        "judge_cost_usd_total": sum(r.judge_cost_usd for r in scored),
        "tool_calls_per_example": {k: v / n for k, v in sorted(calls.items())} if n else {},
        "tool_share": {k: v / total_calls for k, v in sorted(calls.items())} if total_calls else {},
    }


def pass_hat_k(results: Iterable[ExampleResult]) -> dict[int, float]:
    """τ²-bench's pass^k for k = 1..n: the mean over examples of C(c, k) / C(n, k), where an example had n scored
    trials of which c were correct (the chance that k trials drawn without replacement all succeed). Examples
    with fewer scored trials than the most-tried one are left out, so every k averages the same examples."""
    trials: dict[str, list[bool]] = {}
    for r in results:
        if r.status == "ok":
            trials.setdefault(r.id, []).append(bool(r.correct))
    if not trials:
        return {}
    n = max(len(t) for t in trials.values())
    full = [t for t in trials.values() if len(t) == n]
    return {k: sum(math.comb(sum(t), k) / math.comb(n, k) for t in full) / len(full) for k in range(1, n + 1)}


def markdown_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per run label: accuracy ± interval, cost, latency, turns, tool use."""
    trials = any(s.get("pass_hat_k") for s in rows.values())
    lines = [
        "| run | n | accuracy (95% CI) | mean cost $ | total cost $ | mean latency s | turns | tool use |"
        + (" pass^k |" if trials else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if trials else ""),
    ]
    for label, s in rows.items():
        low, high = s["accuracy_ci95"]
        tools = ", ".join(f"{k} {v:.0%}" for k, v in s["tool_share"].items()) or "none"
        passes = ", ".join(f"^{k} {v:.1%}" for k, v in (s.get("pass_hat_k") or {}).items())
        lines.append(
            f"| {label} | {s['scored']} | {s['accuracy']:.1%} ({low:.1%}-{high:.1%}) | {s['cost_usd_mean']:.5f} | "
            f"{s['cost_usd_total']:.4f} | {s['latency_s_mean']:.2f} | {s['turns_mean']:.2f} | {tools} |"
            + (f" {passes or '-'} |" if trials else "")
        )
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | os.PathLike, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """summary.json and summary.md, each written to a temp file and renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps(rows, indent=2) + "\n"), ("summary.md", markdown_table(rows))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
