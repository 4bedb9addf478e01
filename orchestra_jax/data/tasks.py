"""Our task JSONL: one task per line, the shape every task source (files, tau2, synthesis) is converted to.

A line is `{"id", "question", "answer", "tools", "preference", "metadata"}`:
- `id` (string, unique in the file) and `question` (the user's request, non-empty) are required;
- `answer` is the reference answer for exact-match/judge tasks, or null when an evaluator grades the episode
  (synthesised domain tasks: `metadata.evaluator == "domain"`);
- `tools` names the tools the policy may call (empty = the caller's default catalog);
- `preference` is null or the JSON form of a preference (a list of weights or an object), passed through;
- `metadata` is free-form; domain tasks carry `domain`, `domain_dir` (relative to the JSONL file),
  `gold_actions`, `communicate_info` and `reward_basis`.
Field names match `env.episode.Task` (id, question, answer, tools, preference, metadata).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from orchestra_jax.env.domain import Action, DomainTask, write_text_atomic
from orchestra_jax.env.episode import EpisodeSetup
from orchestra_jax.env.preferences import Preference, PreferenceError
from orchestra_jax.env.trajectory import Task


class TaskFileError(ValueError):
    """A task file that does not parse; the message starts with file:line."""


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    id: str
    question: str
    answer: str | None = None
    tools: tuple[str, ...] = ()
    preference: Any = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "tools": list(self.tools),
                "preference": self.preference, "metadata": dict(self.metadata)}


FIELDS = ("id", "question", "answer", "tools", "preference", "metadata")


def task_from_dict(d: Any, where: str) -> TaskRecord:
    """Validate one decoded line; errors read `where: field 'x': problem`."""
    if not isinstance(d, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(d).__name__}")
    extra = sorted(set(d) - set(FIELDS))
    if extra:
        raise TaskFileError(f"{where}: unknown field(s) {extra} (allowed: {', '.join(FIELDS)})")
    for name in ("id", "question"):
        if not isinstance(d.get(name), str) or not d[name].strip():
            raise TaskFileError(f"{where}: field {name!r}: expected a non-empty string, got {d.get(name)!r:.60}")
    answer = d.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise TaskFileError(f"{where}: field 'answer': expected a string or null, got {type(answer).__name__}")
    tools = d.get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise TaskFileError(f"{where}: field 'tools': expected a list of tool names")
    metadata = d.get("metadata", {})
    if not isinstance(metadata, dict):
        raise TaskFileError(f"{where}: field 'metadata': expected an object")
    return TaskRecord(d["id"], d["question"], answer, tuple(tools), d.get("preference"), metadata)


def parse_tasks(lines: Iterable[str], source: str) -> list[TaskRecord]:
    tasks: list[TaskRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        task = task_from_dict(d, where)
        if task.id in seen:
            raise TaskFileError(f"{where}: duplicate id {task.id!r} (first on line {seen[task.id]})")
        seen[task.id] = lineno
        tasks.append(task)
    return tasks


def load_tasks(path: str | os.PathLike) -> list[TaskRecord]:
    """Read a task JSONL file; any problem raises TaskFileError naming file:line and the field."""
    path = pathlib.Path(path)
    try:
        with path.open() as f:
            return parse_tasks(f, str(path))
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such task file") from None
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text ({e.reason})") from None


def write_tasks(path: str | os.PathLike, tasks: Iterable[TaskRecord | Mapping]) -> None:
    """Write JSONL atomically (temp file, then rename)."""
    rows = [t.to_dict() if isinstance(t, TaskRecord) else dict(t) for t in tasks]
    write_text_atomic(pathlib.Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def domain_dir(task: TaskRecord, tasks_path: str | os.PathLike) -> pathlib.Path:
    """The domain folder of a synthesised task, resolved against the JSONL file it came from."""
    rel = task.metadata.get("domain_dir")
    if not isinstance(rel, str):
        raise TaskFileError(f"{tasks_path}: task {task.id!r} has no metadata.domain_dir")
    return (pathlib.Path(tasks_path).parent / rel).resolve()


def to_task(record: TaskRecord, where: str = "task") -> Task:
    """The episode's `Task`; a list preference is a vector over `record.tools` (+ outcome, cost, latency)."""
    try:
        if isinstance(record.preference, list):
            preference = Preference.from_vector(record.tools, record.preference)
        else:
            preference = Preference.from_json(record.preference or {})
    except (PreferenceError, ValueError, TypeError) as e:
        raise TaskFileError(f"{where}: task {record.id!r}: {e}") from None
    return Task(record.id, record.question, record.answer, record.tools, preference, dict(record.metadata))


def domain_task(task: TaskRecord | Task) -> DomainTask:
    """The τ²-style grading view of a synthesised task (metadata written by `orchestra-jax synth`)."""
    meta = task.metadata
    if meta.get("evaluator") != "domain":
        raise TaskFileError(f"task {task.id!r} is not a domain task (metadata.evaluator is {meta.get('evaluator')!r})")
    try:
        actions = tuple(Action(a["name"], dict(a["arguments"])) for a in meta["gold_actions"])
        return DomainTask(task.id, dict(meta.get("user_scenario", {})), actions, tuple(meta.get("communicate_info", ())),
                          tuple(meta.get("nl_assertions", ())), tuple(meta.get("reward_basis", ("DB", "COMMUNICATE"))))
    except (KeyError, TypeError) as e:
        raise TaskFileError(f"task {task.id!r}: malformed domain metadata ({type(e).__name__}: {e})") from None


def load_playable_tasks(path: str | os.PathLike) -> list[Task]:
    """A task file's episode Tasks, ready to play (see `playable_tasks`). Raises TaskFileError."""
    return playable_tasks(load_tasks(path), path)


def playable_tasks(records: Iterable[TaskRecord], path: str | os.PathLike) -> list[Task]:
    """The records of the task file at `path` as episode Tasks: each remembers its file (metadata.tasks_file),
    and a synthesised domain task gets its domain's policy as the system prompt. Raises TaskFileError."""
    out = []
    for task in (to_task(r, str(path)) for r in records):
        metadata = {**task.metadata, "tasks_file": str(path)}
        if metadata.get("evaluator") == "domain" and "system_prompt" not in metadata:
            try:
                metadata["system_prompt"] = _domain(str(domain_dir(task, path))).policy
            except ValueError as e:
                raise TaskFileError(str(e).splitlines()[0]) from None
        out.append(dataclasses.replace(task, metadata=metadata))
    return out


def domain_setup(task: Task, default: EpisodeSetup) -> EpisodeSetup:
    """A synthesised domain task (metadata.evaluator 'domain') plays in its own database with the domain's tools
    and is graded by the domain's evaluator on the final message (verified by execution); other tasks use
    `default`."""
    if task.metadata.get("evaluator") != "domain":
        return default
    from orchestra_jax.env.domain import DomainEnv

    env = DomainEnv(_domain(str(domain_dir(task, task.metadata["tasks_file"]))), domain_task(task))

    async def grade(answer: str | None) -> bool:
        return env.score([answer] if answer else []).reward > 0

    return EpisodeSetup(env.catalog(), grader=grade)


@functools.cache
def _domain(directory: str) -> Any:
    from orchestra_jax.env.domain import load_domain

    return load_domain(directory)
