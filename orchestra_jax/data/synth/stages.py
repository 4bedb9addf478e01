"""The synthesis pipeline: subjects -> schema -> data model -> database (rounds) -> tools -> intents -> tasks
-> evolve -> verify, the same for every backend (an LLM teacher or the procedural templates).

A backend only proposes; this module validates every proposal the same way: the data model is checked, each
database record is validated against it (rejected records are counted), each tool is checked against the data
model and probed on the database, and every task draft is replayed (verify.py). A required stage that fails
stops the run with a report that says where; a failed task or evolve call is recorded and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from orchestra_jax.data import tasks as tasks_lib
from orchestra_jax.data.synth import evolve as evolve_lib
from orchestra_jax.data.synth import verify
from orchestra_jax.env import domain as domain_lib
from orchestra_jax.env.domain import Domain, ToolSpec

DOMAIN_NAME = re.compile(r"^[a-z][a-z0-9_]{1,39}$")


class StageFailed(RuntimeError):
    """A backend could not produce a valid value for a stage (after its retries)."""

    def __init__(self, stage: str, detail: str, last_value: Any = None):
        super().__init__(f"stage {stage}: {detail}")
        self.stage, self.detail, self.last_value = stage, detail, last_value


class Backend(Protocol):
    """Proposes each stage's value as plain JSON; raises StageFailed when it cannot."""

    name: str

    def subjects(self, domain: str) -> list[str]: ...
    def schema(self, domain: str, subjects: Sequence[str]) -> dict: ...
    def data_model(self, domain: str, schema: Mapping) -> dict: ...
    def records(self, domain: str, data_model: Mapping, db: Mapping, round_index: int, per_table: int) -> dict: ...
    def tools(self, domain: str, data_model: Mapping) -> list[dict]: ...
    def intents(self, domain: str, subjects: Sequence[str], tools: Sequence[ToolSpec], count: int) -> list[str]: ...
    def task(self, domain: Domain, intent: str, index: int) -> dict: ...
    def evolve(self, domain: Domain, draft: Mapping, index: int) -> dict: ...


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    domain: str
    num_tasks: int = 24
    db_rounds: int = 3
    records_per_round: int = 4  # per table and round
    evolve_fraction: float = 0.5
    dedup_threshold: float = 0.8
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SynthResult:
    domain: Domain | None
    tasks: tuple[tuple[str, dict], ...]  # (task id, verified draft)
    report: Mapping[str, Any]


def check_domain_name(name: str) -> None:
    if not DOMAIN_NAME.match(name or ""):
        raise ValueError(f"domain name {name!r} must be 2-40 characters of a-z, 0-9 and _, starting with a letter")


def table_order(data_model: Mapping) -> list[str]:
    """Tables with referenced tables first, so records can check their references as they arrive."""
    tables = data_model["tables"]
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name in path:
            return
        for spec in tables[name]["fields"].values():
            if spec.get("ref") and spec["ref"] != name:
                visit(spec["ref"], path + (name,))
        order.append(name)

    for name in tables:
        visit(name, ())
    return order


def accept_records(data_model: Mapping, db: Mapping, proposal: Any, stats: dict) -> dict:
    """Add each proposed record that validates against the data model and the records accepted so far
    (references, unique fields); count the rest as rejected. Returns the new database."""
    if not isinstance(proposal, Mapping):
        proposal = {}
    for table in [t for t in proposal if t not in db]:
        n = len(proposal[table]) if isinstance(proposal[table], Mapping) else 1
        stats["proposed"] += n
        stats["rejected"] += n
        stats["examples"].append(f"unknown table {table!r}")
    for table in table_order(data_model):
        records = proposal.get(table) or {}
        for key, record in (records.items() if isinstance(records, Mapping) else ()):
            stats["proposed"] += 1
            errors = [f"{table}/{key}: key already used"] if key in db[table] else []
            candidate = {**db, table: {**db[table], key: record}}
            errors = errors or domain_lib.check_record(data_model, candidate, table, key, record)
            if errors:
                stats["rejected"] += 1
                if len(stats["examples"]) < 5:
                    stats["examples"].append(errors[0][:200])
            else:
                db = candidate
                stats["accepted"] += 1
    return dict(db)


def new_record_stats() -> dict:
    return {"rounds": 0, "failed_rounds": 0, "proposed": 0, "accepted": 0, "rejected": 0, "examples": []}


def grow_database(backend: Backend, config: SynthConfig, data_model: Mapping) -> tuple[dict, dict]:
    """Database records in rounds, each round proposed by the backend and filtered by accept_records, so the
    database always validates."""
    db: dict[str, dict] = {t: {} for t in data_model["tables"]}
    stats = new_record_stats()
    for round_index in range(config.db_rounds):
        try:
            proposal = backend.records(config.domain, data_model, db, round_index, config.records_per_round)
        except StageFailed as e:
            stats["failed_rounds"] += 1
            stats["examples"].append(f"round {round_index}: {e.detail}"[:200])
            continue
        stats["rounds"] += 1
        db = accept_records(data_model, db, proposal, stats)
    return db, stats


def build_tools(raw_tools: Sequence[Any], data_model: Mapping, db: Mapping) -> tuple[tuple[ToolSpec, ...], dict]:
    """Keep tools that are well-formed on the data model and that run on the database at least once."""
    stats = {"proposed": len(raw_tools), "invalid": 0, "never_ran": 0, "kept": 0, "examples": []}
    valid: list[ToolSpec] = []
    for raw in raw_tools:
        try:
            tool = domain_lib.tool_from_dict(raw)
            errors = domain_lib.check_tool(data_model, tool)
        except domain_lib.DomainError as e:
            errors = [str(e)]
        if errors or any(t.name == tool.name for t in valid):
            stats["invalid"] += 1
            stats["examples"].append((errors or [f"duplicate tool name {tool.name}"])[0][:200])
        else:
            valid.append(tool)
    probe = verify.probe_tools(Domain("probe", data_model, tuple(valid), "", db), max_records=50)
    kept = tuple(t for t in valid if probe[t.name] is None)
    for name, error in probe.items():
        if error is not None:
            stats["never_ran"] += 1
            stats["examples"].append(f"tool {name} never ran: {error}"[:200])
    stats["kept"] = len(kept)
    return kept, stats


def render_policy(domain: str, data_model: Mapping, tools: Sequence[ToolSpec]) -> str:
    """Policy text from the tools themselves, so every rule it states is one the runtime enforces."""
    title = domain.replace("_", " ")
    lines = [f"# {title.capitalize()} agent policy", "",
             f"As a {title} agent you help one user per conversation, using only these tools.", "",
             "## Rules", "- Identify the user first and act only on records that belong to them.",
             "- Make one tool call at a time. Read the records you need before changing anything.",
             "- Before any change, state what you will do. Never invent information the tools did not give.", "",
             "## What you can do"]
    for tool in tools:
        conditions = "; ".join(f"{c['field']} {c['op']} {c.get('value', c.get('param'))!r}" for c in tool.preconditions)
        suffix = f" (only when {conditions})" if conditions else ""
        lines.append(f"- `{tool.name}` ({tool.kind} {tool.table}): {tool.description}{suffix}")
    lines += ["", "## Records"]
    for name, table in data_model["tables"].items():
        lines.append(f"- {name} (key {table['key']}): {table.get('description', '')}".rstrip(": "))
    return "\n".join(lines) + "\n"


def synthesize(backend: Backend, config: SynthConfig) -> SynthResult:
    """Run every stage; the report carries per-stage counts, the filter report and where a run stopped."""
    check_domain_name(config.domain)
    report: dict[str, Any] = {"domain": config.domain, "backend": backend.name, "config": dataclasses.asdict(config),
                              "stopped_at": None}

    def stop(stage: str, detail: str) -> SynthResult:
        report["stopped_at"] = {"stage": stage, "detail": detail[:500]}
        return SynthResult(None, (), report)

    try:
        subjects = list(backend.subjects(config.domain))
    except StageFailed as e:  # subjects only add diversity: go on with the domain name alone
        subjects = [config.domain.replace("_", " ")]
        report["subjects_failed"] = e.detail[:300]
    report["subjects"] = subjects
    try:
        sketch = backend.schema(config.domain, subjects)
        report["schema_tables"] = sorted(sketch.get("tables", {}))
        data_model = backend.data_model(config.domain, sketch)
    except StageFailed as e:
        return stop(e.stage, e.detail)
    errors = domain_lib.check_data_model(data_model)
    if errors:
        return stop("data_model", errors[0])
    db, report["database"] = grow_database(backend, config, data_model)
    if not any(db.values()):
        return stop("database", "no record was accepted")
    try:
        raw_tools = backend.tools(config.domain, data_model)
    except StageFailed as e:
        return stop(e.stage, e.detail)
    tools, report["tools"] = build_tools(raw_tools, data_model, db)
    if not any(t.writes for t in tools) or not any(not t.writes for t in tools):
        return stop("tools", "need at least one read/search tool and one write tool that run on the database")
    domain = Domain(config.domain, data_model, tools, render_policy(config.domain, data_model, tools), db)
    try:
        intents = list(backend.intents(config.domain, subjects, tools, config.num_tasks))[:config.num_tasks]
    except StageFailed as e:
        return stop(e.stage, e.detail)
    report["intents"] = len(intents)
    drafts: list[tuple[str, Any]] = []
    failures: dict[str, verify.Verdict] = {}
    for index, intent in enumerate(intents):
        task_id = f"{config.domain}_{index:04d}"
        try:
            drafts.append((task_id, backend.task(domain, intent, index)))
        except StageFailed as e:
            drafts.append((task_id, e.last_value))  # the last reply is still classified by the filter
            if e.last_value is None:
                failures[task_id] = verify.Verdict("generation_failed", e.detail)
    drafts, report["evolve"] = evolve_lib.evolve_drafts(backend, domain, drafts, config.evolve_fraction, config.seed)
    kept, filter_report = verify.filter_tasks(domain, drafts, dedup_threshold=config.dedup_threshold, verdicts=failures)
    report["filter"] = filter_report.to_dict()
    return SynthResult(domain, tuple(kept), report)


def compose_question(scenario: Mapping[str, str]) -> str:
    """The user's request as one message (no user simulator): the reason for the call plus what they know."""
    parts = [scenario.get("reason_for_call", "").strip()]
    if scenario.get("known_info", "").strip():
        parts.append("Details I can give: " + scenario["known_info"].strip())
    return "\n\n".join(p for p in parts if p)


def write_outputs(result: SynthResult, out_dir: str | pathlib.Path, extra_report: Mapping | None = None) -> dict:
    """τ²-style domain folder, our task JSONL beside it, and report.json; every file written atomically."""
    out = pathlib.Path(out_dir)
    report = {**result.report, **(extra_report or {})}
    paths: dict[str, str] = {"report": str(out / "report.json")}
    if result.domain is not None:
        name = result.domain.name
        tau2 = [domain_lib.task_to_dict(verify.to_domain_task(tid, d), name,
                                        {"expected_changes": d["expected_changes"], "evolved": bool(d.get("evolved"))})
                for tid, d in result.tasks]
        domain_lib.save_domain(result.domain, out / name, tau2)
        tool_names = [t.name for t in result.domain.tools]
        records = [tasks_lib.TaskRecord(
            id=tid, question=compose_question(d["user_scenario"]), answer=None, tools=tuple(tool_names),
            metadata={"evaluator": "domain", "domain": name, "domain_dir": name, "user_scenario": d["user_scenario"],
                      "gold_actions": d["actions"], "communicate_info": d["communicate_info"],
                      "nl_assertions": d.get("nl_assertions", []), "reward_basis": ["DB", "COMMUNICATE"],
                      "evolved": bool(d.get("evolved"))})
            for tid, d in result.tasks]
        tasks_lib.write_tasks(out / "tasks.jsonl", records)
        paths.update(domain=str(out / name), tasks=str(out / "tasks.jsonl"))
    report["outputs"] = paths
    domain_lib.write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report
