"""A generic τ²-style domain environment: a relational database, declarative tools and a policy text.

Tools are data, not code. Each `ToolSpec` is read, search, update or create over one table, with an argument
schema, preconditions and effects that `execute` interprets. The database is a dict `{table: {key: record}}` of
flat records; `execute` never mutates its input database and returns a new one (records are copied on write).
An episode is scored the τ²-bench way (`score_episode`): the final database must equal the state reached by the
task's gold actions, every `communicate_info` string must appear in the agent's messages, and (when the task's
reward basis asks for it) every gold action must have been called with the same arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jsonschema

from orchestra_jax.env.domain_model import (  # noqa: F401  (re-exported: the domain's data-model checks)
    FIELD_TYPES,
    check_data_model,
    check_database,
    check_record,
    record_schema,
)

TOOL_KINDS = ("read", "search", "update", "create")
OPERATORS = ("eq", "ne", "in", "not_in", "lt", "le", "gt", "ge")
EFFECT_SOURCES = ("value", "param", "add_param", "add_value")


class DomainError(ValueError):
    """A domain folder, data model, tool spec or task that does not hold together; the message names where."""


# ----------------------------------------------------------------------------------------------- tools


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One declarative tool. `parameters` maps a name to {"type", "description", optional "enum"}; all are
    required. read/update find their record by `key_param`; search returns the records whose fields equal the
    `match` parameters (field -> parameter); update/create apply `effects` ({"field", and one of "value",
    "param", "add_param", "add_value"; adds take an optional "sign": -1}) after `preconditions`
    ({"field", "op", and "value" or "param"}) hold. The changed record must still validate."""

    name: str
    description: str
    kind: str
    table: str
    parameters: Mapping[str, Mapping[str, Any]]
    key_param: str | None = None
    match: Mapping[str, str] = dataclasses.field(default_factory=dict)
    preconditions: tuple[Mapping[str, Any], ...] = ()
    effects: tuple[Mapping[str, Any], ...] = ()
    returns: tuple[str, ...] = ()

    @property
    def writes(self) -> bool:
        return self.kind in ("update", "create")

    def openai_schema(self) -> dict:
        """The function schema the chat template's `tools=` takes."""
        properties = {p: {k: v for k, v in s.items() if k in ("type", "description", "enum")}
                      for p, s in self.parameters.items()}
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties)}}}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def tool_from_dict(d: Mapping[str, Any]) -> ToolSpec:
    """A ToolSpec from its JSON form; raises DomainError naming the bad field."""
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
        raise DomainError(f"tool spec needs a string 'name': {str(d)[:80]}")
    known = {f.name for f in dataclasses.fields(ToolSpec)}
    extra = set(d) - known
    if extra:
        raise DomainError(f"tool {d['name']}: unknown fields {sorted(extra)}")
    try:
        return ToolSpec(**{**d, "preconditions": tuple(d.get("preconditions") or ()),
                           "effects": tuple(d.get("effects") or ()), "returns": tuple(d.get("returns") or ()),
                           "match": dict(d.get("match") or {})})
    except (TypeError, ValueError) as e:
        raise DomainError(f"tool {d['name']}: {e}") from None


def check_tool(data_model: Mapping, tool: ToolSpec) -> list[str]:
    """Errors that make a tool meaningless on this data model (unknown table/field/parameter, bad kind)."""
    where = f"tool {tool.name}"
    tables = data_model["tables"]
    if not isinstance(tool.description, str):
        return [f"{where}: description must be a string"]
    if tool.kind not in TOOL_KINDS:
        return [f"{where}: kind {tool.kind!r} is not one of {TOOL_KINDS}"]
    if not _named(tool.table, tables):
        return [f"{where}: unknown table {tool.table!r}"]
    fields = tables[tool.table]["fields"]
    params = tool.parameters if isinstance(tool.parameters, Mapping) else {}
    errors = [] if isinstance(tool.parameters, Mapping) else [f"{where}: parameters must be an object"]
    for pname, spec in params.items():
        if not isinstance(spec, Mapping) or not _named(spec.get("type"), FIELD_TYPES) or \
                not isinstance(spec.get("enum", []), list):
            errors.append(f"{where}: parameter {pname} needs a type in {sorted(FIELD_TYPES)} (and a list enum)")
    if tool.kind in ("read", "update") and not _named(tool.key_param, params):
        errors.append(f"{where}: key_param {tool.key_param!r} is not a parameter")
    if tool.kind == "search" and not tool.match:
        errors.append(f"{where}: a search needs 'match' (field -> parameter)")
    for fname, pname in tool.match.items():
        if not _named(fname, fields) or not _named(pname, params):
            errors.append(f"{where}: match {fname!r}->{pname!r} needs a field and a parameter")
    for cond in tool.preconditions:
        if not isinstance(cond, Mapping) or not _named(cond.get("field"), fields) or cond.get("op") not in OPERATORS:
            errors.append(f"{where}: precondition {cond!r} needs a known field and op in {OPERATORS}")
        elif "param" in cond and not _named(cond["param"], params):
            errors.append(f"{where}: precondition parameter {cond['param']!r} is not a parameter")
    for effect in tool.effects:
        sources = [k for k in EFFECT_SOURCES if k in effect] if isinstance(effect, Mapping) else []
        if len(sources) != 1 or not _named(effect.get("field"), fields):
            errors.append(f"{where}: effect {effect!r} needs a known field and one of {EFFECT_SOURCES}")
        elif sources[0] in ("param", "add_param") and not _named(effect[sources[0]], params):
            errors.append(f"{where}: effect parameter {effect[sources[0]]!r} is not a parameter")
        elif sources[0] in ("add_param", "add_value") and not isinstance(effect.get("sign", 1), (int, float)):
            errors.append(f"{where}: effect sign must be 1 or -1")
        elif sources[0] == "add_value" and not isinstance(effect["add_value"], (int, float)):
            errors.append(f"{where}: add_value must be a number")
    if tool.writes and not tool.effects:
        errors.append(f"{where}: a {tool.kind} tool needs effects")
    errors += [f"{where}: returns unknown field {f!r}" for f in tool.returns if not _named(f, fields)]
    return errors


def _named(name: Any, names: Mapping) -> bool:
    """`name` is a string key of `names` (LLM-written specs may put any JSON value anywhere)."""
    return isinstance(name, str) and name in names


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """The database after a call, the observation text the policy sees, and the error (None on success)."""

    db: Mapping[str, Any]
    observation: str
    error: str | None = None


def execute(data_model: Mapping, tools: Mapping[str, ToolSpec], db: Mapping, name: str, arguments: Any) -> ToolOutcome:
    """Run one tool call. Never raises for bad calls: the error comes back as the observation."""
    try:
        new_db, result = _run(data_model, tools, db, name, arguments)
    except DomainError as e:
        return ToolOutcome(db, f"Error: {e}", str(e))
    return ToolOutcome(new_db, json.dumps(result, ensure_ascii=False))


def _run(data_model: Mapping, tools: Mapping[str, ToolSpec], db: Mapping, name: str, arguments: Any):
    tool = tools.get(name)
    if tool is None:
        raise DomainError(f"unknown tool {name!r}")
    schema = tool.openai_schema()["function"]["parameters"] | {"additionalProperties": False}
    error = next(jsonschema.Draft202012Validator(schema).iter_errors(arguments), None)
    if error is not None:
        raise DomainError(f"invalid arguments for {name}: {error.message}")
    table = data_model["tables"][tool.table]
    records = db[tool.table]
    project = (lambda r: {f: r[f] for f in tool.returns}) if tool.returns else dict
    if tool.kind == "search":
        hits = [r for _, r in sorted(records.items())
                if all(r.get(f) == arguments[p] for f, p in tool.match.items())]
        return db, [project(r) for r in hits]
    if tool.kind == "create":
        key = _next_key(table, records)
        record = {f: None for f in table["fields"]} | {table["key"]: key}
    else:
        key = arguments[tool.key_param]
        if key not in records:
            raise DomainError(f"{tool.table} {key!r} not found")
        record = dict(records[key])
    if tool.kind == "read":
        return db, project(record)
    for cond in tool.preconditions:
        _check_condition(tool.table, key, record, cond, arguments)
    for effect in tool.effects:
        if "value" in effect:
            record[effect["field"]] = effect["value"]
        elif "param" in effect:
            record[effect["field"]] = arguments[effect["param"]]
        else:
            delta = effect["add_value"] if "add_value" in effect else arguments[effect["add_param"]]
            sign = -1 if effect.get("sign", 1) < 0 else 1
            record[effect["field"]] = round((record[effect["field"]] or 0) + sign * delta, 2)
    new_db = {**db, tool.table: {**records, key: record}}
    problems = check_record(data_model, new_db, tool.table, key, record)
    if problems:
        raise DomainError(f"{name} would leave an invalid record: {problems[0]}")
    return new_db, project(record)


def _next_key(table: Mapping, records: Mapping) -> str:
    """Deterministic fresh key: the table's `key_prefix` (or its initial) and the first free number."""
    prefix = table.get("key_prefix") or table["key"][:2].upper()
    n = len(records) + 1
    while f"{prefix}{n:04d}" in records:
        n += 1
    return f"{prefix}{n:04d}"


def _check_condition(table: str, key: str, record: Mapping, cond: Mapping, arguments: Mapping) -> None:
    actual = record.get(cond["field"])
    expected = arguments[cond["param"]] if "param" in cond else cond.get("value")
    op = cond["op"]
    try:
        holds = {"eq": lambda: actual == expected, "ne": lambda: actual != expected,
                 "in": lambda: actual in expected, "not_in": lambda: actual not in expected,
                 "lt": lambda: actual < expected, "le": lambda: actual <= expected,
                 "gt": lambda: actual > expected, "ge": lambda: actual >= expected}[op]()
    except TypeError:
        holds = False
    if not holds:
        raise DomainError(f"precondition failed: {table} {key} {cond['field']} must be {op} {expected!r} "
                          f"(it is {actual!r})")


# ----------------------------------------------------------------------------------------------- domain + tasks


@dataclasses.dataclass(frozen=True)
class Domain:
    """Everything an episode needs: the initial database, the data model, the tools and the policy text."""

    name: str
    data_model: Mapping[str, Any]
    tools: tuple[ToolSpec, ...]
    policy: str
    db: Mapping[str, Any]

    @property
    def tool_map(self) -> dict[str, ToolSpec]:
        return {t.name: t for t in self.tools}

    def tool_schemas(self) -> list[dict]:
        return [t.openai_schema() for t in self.tools]


@dataclasses.dataclass(frozen=True)
class Action:
    name: str
    arguments: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class DomainTask:
    """A τ²-style task: what the user wants (`user_scenario`), gold actions and what must be communicated."""

    id: str
    user_scenario: Mapping[str, str]
    actions: tuple[Action, ...]
    communicate_info: tuple[str, ...] = ()
    nl_assertions: tuple[str, ...] = ()
    reward_basis: tuple[str, ...] = ("DB", "COMMUNICATE")


def replay(domain: Domain, actions: Iterable[Action], db: Mapping | None = None) -> tuple[Mapping, list[ToolOutcome]]:
    """Run actions in order from `db` (default: the domain's initial database)."""
    state = domain.db if db is None else db
    outcomes = []
    tool_map = domain.tool_map
    for action in actions:
        outcome = execute(domain.data_model, tool_map, state, action.name, dict(action.arguments))
        outcomes.append(outcome)
        state = outcome.db
    return state, outcomes


@dataclasses.dataclass(frozen=True)
class EpisodeScore:
    reward: float
    db_match: bool
    communicate_ok: bool
    actions_ok: bool


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _says(info: str, messages: Sequence[str]) -> bool:
    """τ²'s communicate check: case-insensitive substring, commas ignored."""
    needle = info.lower().replace(",", "")
    return any(needle in m.lower().replace(",", "") for m in messages)


def score_episode(domain: Domain, task: DomainTask, final_db: Mapping, agent_actions: Sequence[Action],
                  agent_messages: Sequence[str]) -> EpisodeScore:
    """Reward = product of the checks named in the task's reward basis (DB, COMMUNICATE, ACTION)."""
    gold_db, _ = replay(domain, task.actions)
    db_match = _canonical(final_db) == _canonical(gold_db)
    communicate_ok = all(_says(info, agent_messages) for info in task.communicate_info)
    taken = {(a.name, _canonical(dict(a.arguments))) for a in agent_actions}
    actions_ok = all((a.name, _canonical(dict(a.arguments))) in taken for a in task.actions)
    checks = {"DB": db_match, "COMMUNICATE": communicate_ok, "ACTION": actions_ok}
    reward = float(all(checks[b] for b in task.reward_basis))
    return EpisodeScore(reward, db_match, communicate_ok, actions_ok)


class DomainEnv:
    """One episode in a domain: tool calls change this episode's database; `score` grades it at the end."""

    def __init__(self, domain: Domain, task: DomainTask | None = None):
        self.domain, self.task = domain, task
        self.db: Mapping[str, Any] = domain.db
        self.actions: list[Action] = []
        self._tool_map = domain.tool_map

    def call(self, name: str, arguments: Any) -> ToolOutcome:
        outcome = execute(self.domain.data_model, self._tool_map, self.db, name, arguments)
        self.db = outcome.db
        self.actions.append(Action(name, dict(arguments) if isinstance(arguments, Mapping) else {}))
        return outcome

    def score(self, agent_messages: Sequence[str]) -> EpisodeScore:
        if self.task is None:
            raise DomainError("this episode has no task to score against")
        return score_episode(self.domain, self.task, self.db, self.actions, agent_messages)

    def catalog(self) -> Any:
        """The domain's tools as an episode `ToolCatalog` bound to this environment: calls change `self.db`."""
        from orchestra_jax.env.catalog import Tool, ToolCatalog, ToolResult

        def bind(spec: ToolSpec) -> Tool:
            async def run(arguments: dict[str, Any], context: Any) -> ToolResult:
                outcome = self.call(spec.name, arguments)
                return ToolResult(outcome.observation, error=outcome.error)

            return Tool(spec.name, spec.description, spec.openai_schema()["function"]["parameters"], run)

        return ToolCatalog(tuple(bind(t) for t in self.domain.tools))


# ----------------------------------------------------------------------------------------------- files


def task_from_dict(d: Mapping[str, Any], where: str = "task") -> DomainTask:
    """A DomainTask from its τ² tasks.json entry."""
    try:
        criteria = d["evaluation_criteria"]
        actions = tuple(Action(a["name"], dict(a["arguments"])) for a in criteria.get("actions") or ())
        return DomainTask(
            id=str(d["id"]), actions=actions,
            user_scenario={k: v for k, v in d["user_scenario"]["instructions"].items() if k != "domain"},
            communicate_info=tuple(criteria.get("communicate_info") or ()),
            nl_assertions=tuple(criteria.get("nl_assertions") or ()),
            reward_basis=tuple(criteria.get("reward_basis") or ("DB", "COMMUNICATE")))
    except (KeyError, TypeError, AttributeError) as e:
        raise DomainError(f"{where}: malformed task ({type(e).__name__}: {e})") from None


def task_to_dict(task: DomainTask, domain_name: str, extra: Mapping[str, Any] | None = None) -> dict:
    """The τ² tasks.json shape (plus our optional `synthesis` annotations)."""
    actions = [{"action_id": f"{task.id}_{i}", "name": a.name, "arguments": dict(a.arguments), "info": None}
               for i, a in enumerate(task.actions)]
    d = {"id": task.id, "description": {"purpose": task.user_scenario.get("reason_for_call", "")},
         "user_scenario": {"persona": None, "instructions": {"domain": domain_name, **task.user_scenario}},
         "initial_state": None,
         "evaluation_criteria": {"actions": actions, "communicate_info": list(task.communicate_info),
                                 "nl_assertions": list(task.nl_assertions), "reward_basis": list(task.reward_basis)}}
    if extra:
        d["synthesis"] = dict(extra)
    return d


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DomainError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise DomainError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_domain(directory: str | os.PathLike) -> Domain:
    """Load and validate a domain folder (db.json, data_model.json, tools.json, policy.md)."""
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise DomainError(f"{root}: not a domain folder")
    data_model = _read_json(root / "data_model.json")
    errors = check_data_model(data_model)
    raw_tools = _read_json(root / "tools.json")
    if not isinstance(raw_tools, list):
        raise DomainError(f"{root / 'tools.json'}: must be a list of tool specs")
    tools = tuple(tool_from_dict(t) for t in raw_tools)
    if not errors:
        errors = [e for t in tools for e in check_tool(data_model, t)]
        errors += check_database(data_model, _read_json(root / "db.json"))
    if errors:
        raise DomainError(f"{root}: {errors[0]} ({len(errors)} problem(s))")
    policy_path = root / "policy.md"
    policy = policy_path.read_text() if policy_path.exists() else ""
    return Domain(root.name, data_model, tools, policy, _read_json(root / "db.json"))


def load_domain_tasks(directory: str | os.PathLike) -> list[DomainTask]:
    path = pathlib.Path(directory) / "tasks.json"
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise DomainError(f"{path}: must be a list of tasks")
    return [task_from_dict(d, f"{path}[{i}]") for i, d in enumerate(raw)]


def write_json_atomic(path: pathlib.Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
    os.replace(tmp, path)


def save_domain(domain: Domain, directory: str | os.PathLike, tasks: Sequence[dict] = ()) -> pathlib.Path:
    """Write a domain folder; `tasks` are τ² tasks.json entries."""
    root = pathlib.Path(directory)
    write_json_atomic(root / "data_model.json", domain.data_model)
    write_json_atomic(root / "tools.json", [t.to_dict() for t in domain.tools])
    write_json_atomic(root / "db.json", domain.db)
    write_text_atomic(root / "policy.md", domain.policy)
    write_json_atomic(root / "tasks.json", list(tasks))
    return root
