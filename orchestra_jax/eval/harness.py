"""Run a benchmark through the episode machinery and record accuracy, dollars and seconds per example.

One evaluation is a list of `RunSpec`s (a label, a turn limit, a preference) crossed with the examples. Each
pair plays one episode (`env.episode.run_episode`) with the policy engine, the toolset's catalog and the
preference in the system prompt; its final answer is judged (exact -> normalised -> LLM judge, the judge's cost
booked apart); the row goes to `results.jsonl` at once (`ResultsFile`). A rerun skips every (run, example) pair
already scored, so a killed run loses at most what was in flight.

Failures are kept apart from wrong answers: an engine that could not be reached (after its retries) or a judge
endpoint that could not be reached makes the row status "error" (a rerun tries it again); a judge reply that
does not parse is a judge error on a scored row (counted wrong and reported). `budget_usd` caps total spend
(policy + tools + judge, rows from earlier runs included): once reached, no new episode starts, the ones in
flight finish and are recorded, and the report says how many were left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from orchestra_jax.env.episode import EpisodeSetup, ToolPool, run_episode
from orchestra_jax.env.judge import JudgeConfig, Verdict, extract_answer, judge_answer
from orchestra_jax.env.llm_tools import ChatClient
from orchestra_jax.env.preferences import Preference
from orchestra_jax.env.prices import PriceTable
from orchestra_jax.env.trajectory import EpisodeConfig, Task, Trajectory
from orchestra_jax.eval.benchmarks import EvalExample
from orchestra_jax.eval.results import ExampleResult, ResultsFile
from orchestra_jax.models.tokenizer import Tokenizer
from orchestra_jax.rollout.engine import RolloutEngine

Judge = Callable[[Task, Trajectory], Awaitable[Verdict]]
SetupFn = Callable[[Task, int], "EpisodeSetup | Awaitable[EpisodeSetup]"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One configuration of a sweep: rows carry `label` (unique) and `group` (the curve it belongs to)."""

    label: str
    group: str
    max_turns: int
    preference: Preference | None = None
    """None keeps each task's own preference."""


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
    concurrency: int = 8
    limit: int | None = None
    """First N examples of the benchmark (the same N for every run)."""
    budget_usd: float | None = None
    progress: bool = True
    trials: int = 1
    """Episodes per (run, example); with k > 1 the summary adds pass^k (τ²-bench's consistency metric)."""
    keep_trajectories: bool = True
    """Append each episode (turns, calls, observations, ledger; no token ids) to trajectories.jsonl."""


@dataclasses.dataclass
class EvalEnvironment:
    """Everything the harness needs besides the examples: the policy, the tools per task, prices and the judge."""

    engine: RolloutEngine
    tokenizer: Tokenizer
    episode: EpisodeConfig
    setup: SetupFn
    prices: PriceTable
    judge: Judge
    tool_workers: int = 16


@dataclasses.dataclass(frozen=True)
class HarnessReport:
    ran: int
    skipped: int
    """Pairs already scored by an earlier run (resumed)."""
    errors: int
    pending: int
    """Pairs not started because the budget ran out."""
    spent_usd: float
    """Total spend recorded in results.jsonl (policy + tools + judge), earlier runs included."""
    stopped: str | None
    """'budget' when the budget stopped the run early."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def example_task(example: EvalExample) -> Task:
    """A benchmark example as an episode task; answer aliases ride in metadata for the judge."""
    metadata = {**example.metadata, "benchmark": example.benchmark, "aliases": list(example.aliases)}
    return Task(example.id, example.question, example.answer, metadata=metadata)


def reference_judge(config: JudgeConfig, client: ChatClient | None = None, prices: PriceTable | None = None) -> Judge:
    """Judge a trajectory's answer against the task's reference (and aliases); tasks without one (tau2, domain
    tasks) keep the verdict their environment's grader gave."""

    async def judge(task: Task, trajectory: Trajectory) -> Verdict:
        if task.answer is None:
            return Verdict(bool(trajectory.correct), "environment")
        if not trajectory.has_valid_answer:
            return Verdict(False, "empty")
        prediction = extract_answer(trajectory.answer) or trajectory.answer.strip()
        references = [task.answer, *task.metadata.get("aliases", ())]
        return await judge_answer(task.question, prediction, references, config=config, client=client, prices=prices)

    return judge


def _spend(row: ExampleResult) -> float:
    return row.cost_usd + row.judge_cost_usd


def _trajectory_id(run: RunSpec, task_id: str, trial: int) -> str:
    return f"{run.label}/{task_id}" + (f"#{trial}" if trial else "")


async def _play(
    env: EvalEnvironment, run: RunSpec, task: Task, pool: ToolPool, trial: int = 0
) -> tuple[ExampleResult, Trajectory | None]:
    if run.preference is not None:
        task = dataclasses.replace(task, preference=run.preference)
    config = dataclasses.replace(env.episode, max_turns=run.max_turns)
    base = dict(id=task.id, run=run.label, group=run.group, max_turns=run.max_turns, trial=trial,
                trajectory_id=_trajectory_id(run, task.id, trial))  # fmt: skip
    try:
        parts = env.setup(task, trial)
        parts = await parts if inspect.isawaitable(parts) else parts
        trajectory = await run_episode(
            env.engine, env.tokenizer, parts.catalog, task, config,
            rollout=trial, prices=env.prices, user=parts.user, grader=parts.grader, pool=pool,
        )  # fmt: skip
    except Exception as e:  # a task its environment cannot set up (a tool the catalog lacks, a bad tau2 task)
        message = str(e).splitlines()[0] if str(e) else ""
        row = ExampleResult(**base, correct=False, cost_usd=0.0, latency_s=0.0, turns=0, status="error",
                            error=f"setup: {type(e).__name__}: {message}")  # fmt: skip
        return row, None
    ledger = trajectory.ledger
    common = dict(
        base,
        cost_usd=ledger.cost_usd,
        latency_s=ledger.tool_latency_s + ledger.policy_latency_s,
        policy_latency_s=ledger.policy_latency_s,
        turns=len(trajectory.turns),
        tool_calls={k: v for k, v in ledger.tool_calls.items() if v},
        answer=trajectory.answer,
        finish_reason=trajectory.finish_reason,
    )
    if trajectory.error is not None:
        return ExampleResult(**common, correct=False, status="error", error=trajectory.error), trajectory
    verdict = await env.judge(task, trajectory)
    unreachable = verdict.error is not None and verdict.error.startswith("judge: ")
    row = ExampleResult(
        **common,
        correct=verdict.correct,
        judge_method=verdict.method,
        judge_error=verdict.error,
        judge_cost_usd=verdict.cost_usd,
        status="error" if unreachable else "ok",
        error=verdict.error if unreachable else None,
    )
    return row, trajectory


def _append_trajectory(path: Path, row: ExampleResult, trajectory: Trajectory) -> None:
    record = {k: v for k, v in trajectory.to_json().items() if k != "samples"}
    record = {"trajectory_id": row.trajectory_id, "run": row.run, "trial": row.trial, **record}
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Progress:
    """A tqdm bar with running accuracy and spend (or nothing, when progress is off)."""

    def __init__(self, total: int, enabled: bool, spent: float):
        self.correct = self.scored = self.errors = 0
        self.spent = spent
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="eval", unit="ex", dynamic_ncols=True)

    def update(self, row: ExampleResult) -> None:
        self.spent += _spend(row)
        if row.status == "ok":
            self.scored += 1
            self.correct += row.correct
        else:
            self.errors += 1
        if self.bar is not None:
            accuracy = self.correct / self.scored if self.scored else 0.0
            self.bar.set_postfix(acc=f"{accuracy:.1%}", spent=f"${self.spent:.4f}", err=self.errors)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_harness(
    tasks: Sequence[Task],
    runs: Sequence[RunSpec],
    env: EvalEnvironment,
    results: ResultsFile,
    config: HarnessConfig = HarnessConfig(),
) -> HarnessReport:
    """Play every (run, task) pair not yet scored in `results`, at most `config.concurrency` at once."""
    if config.concurrency < 1 or config.trials < 1:
        raise ValueError(f"concurrency={config.concurrency} and trials={config.trials}: must be at least 1")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must be unique, got {labels}")
    tasks = list(tasks[: config.limit] if config.limit is not None else tasks)
    earlier = results.read()
    done = {(r.run, r.id, r.trial) for r in earlier if r.status == "ok"}
    todo = [
        (run, task, trial)
        for run in runs
        for task in tasks
        for trial in range(config.trials)
        if (run.label, task.id, trial) not in done
    ]
    skipped = len(runs) * len(tasks) * config.trials - len(todo)
    progress = _Progress(len(todo), config.progress, sum(_spend(r) for r in earlier))
    trajectories = results.path.with_name("trajectories.jsonl")
    pool = ToolPool(env.tool_workers)
    queue = iter(todo)
    counts = {"ran": 0, "errors": 0}
    stopped: list[str] = []

    def over_budget() -> bool:
        return config.budget_usd is not None and progress.spent >= config.budget_usd

    async def worker() -> None:
        for run, task, trial in queue:
            if over_budget():
                stopped.append("budget")
                return
            row, trajectory = await _play(env, run, task, pool, trial)
            results.append(row)
            if config.keep_trajectories and trajectory is not None:
                _append_trajectory(trajectories, row, trajectory)
            counts["ran"] += 1
            counts["errors"] += row.status != "ok"
            progress.update(row)

    try:
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, max(1, len(todo))))))
    finally:
        progress.close()
    pending = len(todo) - counts["ran"]
    return HarnessReport(
        ran=counts["ran"],
        skipped=skipped,
        errors=counts["errors"],
        pending=pending,
        spent_usd=progress.spent,
        stopped="budget" if stopped and pending else None,
    )


def summaries_by_run(rows: Iterable[ExampleResult]) -> dict[str, list[ExampleResult]]:
    """Rows grouped by run label, in first-seen order; an (example, trial) played twice (an error, then ok) keeps
    its last row."""
    latest: dict[tuple[str, str], ExampleResult] = {}
    for row in rows:
        latest[(row.run, row.id, row.trial)] = row
    out: dict[str, list[ExampleResult]] = {}
    for (run, _, _), row in latest.items():
        out.setdefault(run, []).append(row)
    return out


def turn_groups(rows: Iterable[ExampleResult]) -> dict[str, dict[int, str]]:
    """group -> {turn limit: run label}, for groups evaluated at two or more turn limits."""
    groups: dict[str, dict[int, str]] = {}
    for row in rows:
        if row.max_turns is not None:
            groups.setdefault(row.group or row.run, {})[row.max_turns] = row.run
    return {g: t for g, t in groups.items() if len(t) >= 2}
