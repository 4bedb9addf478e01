"""The LLM backend: one structured call per stage through `StructuredClient`.

Each prompt shows a worked example in our own formats, taken from a procedural domain other than the one being
built, and every reply is checked by the same validators the pipeline uses, so a retry carries the exact error
(a bad reference, a tool the data model cannot support, a gold action that fails when executed).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

from orchestra_jax.data.synth import stages, verify
from orchestra_jax.data.synth.llm import StructuredClient
from orchestra_jax.data.synth.templates import TEMPLATES
from orchestra_jax.env import domain as domain_lib
from orchestra_jax.env.domain import Domain, ToolSpec

SYSTEM = ("You design realistic customer-service environments for training tool-using AI agents: relational "
          "databases, tools over them, and user tasks whose solutions are executed to check them. Reply with JSON only.")

FIELD_SPEC = {"type": "object", "properties": {
    "type": {"enum": ["string", "integer", "number", "boolean"]}, "description": {"type": "string"},
    "enum": {"type": "array"}, "ref": {"type": "string"}, "nullable": {"type": "boolean"},
    "unique": {"type": "boolean"}, "minimum": {"type": "number"}, "maximum": {"type": "number"}},
    "required": ["type", "description"], "additionalProperties": False}

SCHEMAS = {
    "subjects": {"type": "object", "required": ["subjects"], "properties": {
        "subjects": {"type": "array", "minItems": 3, "maxItems": 20, "items": {"type": "string", "minLength": 2}}}},
    "schema": {"type": "object", "required": ["tables"], "properties": {"tables": {
        "type": "object", "minProperties": 2, "maxProperties": 8, "additionalProperties": {
            "type": "object", "required": ["key", "fields"], "properties": {
                "description": {"type": "string"}, "key": {"type": "string"},
                "fields": {"type": "object", "minProperties": 2, "additionalProperties": {"type": "string"}}}}}}},
    "data_model": {"type": "object", "required": ["tables"], "properties": {"tables": {
        "type": "object", "minProperties": 2, "additionalProperties": {
            "type": "object", "required": ["description", "key", "key_prefix", "fields"], "properties": {
                "description": {"type": "string"}, "key": {"type": "string"},
                "key_prefix": {"type": "string", "pattern": "^[A-Z]{2,4}$"},
                "fields": {"type": "object", "minProperties": 2, "additionalProperties": FIELD_SPEC}}}}}},
    "records": {"type": "object", "required": ["records"], "properties": {"records": {
        "type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "object"}}}}},
    "tools": {"type": "object", "required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 2, "items": {
        "type": "object", "required": ["name", "description", "kind", "table", "parameters"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"}, "description": {"type": "string"},
            "kind": {"enum": list(domain_lib.TOOL_KINDS)}, "table": {"type": "string"},
            "parameters": {"type": "object"}, "key_param": {"type": ["string", "null"]}, "match": {"type": "object"},
            "preconditions": {"type": "array"}, "effects": {"type": "array"}, "returns": {"type": "array"}}}}}},
    "intents": {"type": "object", "required": ["intents"], "properties": {
        "intents": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 8}}}},
    "task": verify.TASK_DRAFT_SCHEMA,
}


def _example_domain(domain: str) -> str:
    return "library" if domain != "library" else "bank"


def _example_tools(name: str) -> list[dict]:
    from orchestra_jax.data.synth.procedural import derive_read_tools

    template = TEMPLATES[name]
    return derive_read_tools(template)[:3] + [dict(w.tool) for w in template.writes[:2]]


@functools.cache
def example_task() -> dict:
    """A verified task draft from a tiny procedural library domain, shown as the format example."""
    from orchestra_jax.data.synth.procedural import ProceduralBackend

    config = stages.SynthConfig("library", num_tasks=4, db_rounds=1, records_per_round=2, evolve_fraction=0)
    result = stages.synthesize(ProceduralBackend.for_domain("library", seed=7), config)
    return result.tasks[0][1] if result.tasks else {}


def _json(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=1, ensure_ascii=False) + "\n```"


def _user(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


class LLMBackend:
    name = "llm"

    def __init__(self, client: StructuredClient, seed: int = 0):
        self.client, self.seed = client, seed

    def _call(self, stage: str, text: str, check=None, salt: str = "") -> Any:
        result = self.client.complete_json(stage, _user(text), SCHEMAS["task" if stage == "evolve" else stage],
                                           check=check, salt=salt)
        if result.error is not None:
            raise stages.StageFailed(stage, result.error, result.last_value)
        return result.value

    def subjects(self, domain: str) -> list[str]:
        text = (f"List 8 distinct subjects that customers of a {domain} contact support about, each a few words "
                'long, as {"subjects": [...]}.')
        return self._call("subjects", text)["subjects"]

    def schema(self, domain: str, subjects: Sequence[str]) -> dict:
        example = TEMPLATES[_example_domain(domain)]
        sketch = {n: {"description": t["description"], "key": t["key"],
                      "fields": {f: s["description"] for f, s in t["fields"].items()}}
                  for n, t in example.data_model["tables"].items()}
        text = (f"Here is the database schema of a {example.name}: each table, its key field and its fields.\n"
                f"{_json({'tables': sketch})}\nWrite a schema of the same format for a {domain} with 3 to 5 tables. "
                f"One table holds the customers (with a unique email); other tables point to it with an id field. "
                f"It should support these subjects: {', '.join(subjects)}.")
        return self._call("schema", text)

    def data_model(self, domain: str, schema: Mapping) -> dict:
        example = TEMPLATES[_example_domain(domain)]
        text = (f"Here is the typed data model of a {example.name}. Field types are string, integer, number or "
                f"boolean; `enum` lists allowed values, `ref` names the table an id points to, `unique` marks unique "
                f"fields, `minimum`/`maximum` bound numbers, `key_prefix` starts every key.\n"
                f"{_json(example.data_model)}\nWrite the data model, in the same format, for this {domain} schema:\n"
                f"{_json(schema)}\nKeep every field flat (no nested objects or lists).")

        def check(value: Any) -> str | None:
            errors = domain_lib.check_data_model(value)
            return "; ".join(errors[:3]) or None

        return self._call("data_model", text, check)

    def records(self, domain: str, data_model: Mapping, db: Mapping, round_index: int, per_table: int) -> dict:
        used = {t: sorted(rs)[-30:] for t, rs in db.items()}
        text = (f"Data model of a {domain} database:\n{_json(data_model)}\nKeys already used: {json.dumps(used)}\n"
                f"Write {per_table} new, realistic and mutually consistent records for each table, as "
                '{"records": {table: {key: record}}}. A key is the table\'s key_prefix and 4 digits, not already used, '
                "and equals the record's key field. Every field of the data model must be present with the right type; "
                "references must point to existing keys or to keys you create in this reply.")

        def check(value: Any) -> str | None:
            stats = stages.new_record_stats()
            stages.accept_records(data_model, db, value.get("records"), stats)
            return None if stats["accepted"] else ("no record validates: " + "; ".join(stats["examples"][:3]))

        return self._call("records", text, check, salt=f"round{round_index}")["records"]

    def tools(self, domain: str, data_model: Mapping) -> list[dict]:
        example = _example_domain(domain)
        text = (f"Tools are declarative specs over database tables. kind is read (get a record by `key_param`), "
                f"search (records whose fields equal parameters: `match` maps field -> parameter), update (change the "
                f"record at `key_param`) or create (a new record, key generated). `preconditions` are "
                f'{{"field", "op" (one of {list(domain_lib.OPERATORS)}), "value" or "param"}}; `effects` are '
                f'{{"field", and one of "value", "param", "add_param", "add_value", optional "sign": -1}}. '
                f"Example tools of a {example}:\n{_json(_example_tools(example))}\n"
                f"Data model of a {domain}:\n{_json(data_model)}\nWrite 8 to 16 frequently used tools for this "
                'domain, as {"tools": [...]}: a search that finds a customer by email, reads and searches, '
                "and update/create tools for the common requests with the preconditions the business would enforce.")

        def check(value: Any) -> str | None:
            specs, errors = [], []
            for raw in value["tools"]:
                try:
                    spec = domain_lib.tool_from_dict(raw)
                    problems = domain_lib.check_tool(data_model, spec)
                except domain_lib.DomainError as e:
                    problems = [str(e)]
                errors += problems
                specs += [] if problems else [spec]
            if any(s.writes for s in specs) and any(not s.writes for s in specs):
                return None
            return "need valid read and write tools; problems: " + "; ".join(errors[:4])

        return self._call("tools", text, check)["tools"]

    def intents(self, domain: str, subjects: Sequence[str], tools: Sequence[ToolSpec], count: int) -> list[str]:
        names = ", ".join(f"{t.name} ({t.description})" for t in tools)
        text = (f"A {domain} support agent has these tools: {names}.\nWrite {count} distinct things customers "
                f"call about that these tools can resolve, each one sentence, covering: {', '.join(subjects)}. "
                'Reply as {"intents": [...]}.')
        return self._call("intents", text)["intents"]

    def _domain_brief(self, domain: Domain, salt: int) -> str:
        rng = random.Random(f"{self.seed}-{salt}")
        excerpt = {t: dict(rng.sample(sorted(rs.items()), min(4, len(rs)))) for t, rs in domain.db.items()}
        tools = [t.to_dict() for t in domain.tools]
        return f"Policy:\n{domain.policy}\nTools:\n{_json(tools)}\nDatabase excerpt:\n{_json(excerpt)}\n"

    def _task_rules(self) -> str:
        return ("Reply with {user_scenario: {task_instructions, reason_for_call, known_info, unknown_info}, actions: "
                "[{name, arguments}], communicate_info: [...], nl_assertions: [...], expected_changes: [{table, key, "
                "field, value}]}. The actions are the gold solution: real tool names and exact arguments on records "
                "of the excerpt, starting by finding the customer. They are executed: preconditions must hold. "
                "expected_changes lists every field the actions change with its final value (key null for a created "
                "record). communicate_info lists values the agent must tell the user, copied exactly from tool "
                "outputs. known_info holds what the user can tell the agent (email, names), never internal ids.")

    def _task_check(self, domain: Domain, longer_than: int = 0):
        def check(value: Any) -> str | None:
            verdict = verify.check_task(domain, value)
            if verdict.reason:
                return f"{verdict.reason}: {verdict.detail}"
            if len(value["actions"]) <= longer_than:
                return f"the harder task needs more than {longer_than} actions"
            return None
        return check

    def task(self, domain: Domain, intent: str, index: int) -> dict:
        example = example_task()
        text = (f"{self._domain_brief(domain, index)}\nExample task from another domain:\n{_json(example)}\n"
                f"Write a realistic task for a {domain.name} customer who says: {intent}\n{self._task_rules()}")
        return self._call("task", text, self._task_check(domain), salt=f"task{index}")

    def evolve(self, domain: Domain, draft: Mapping, index: int) -> dict:
        text = (f"{self._domain_brief(domain, index)}\nTASK:\n{_json(dict(draft))}\nMake this task harder: add "
                f"constraints, use more tools, require more steps, for the same customer.\n{self._task_rules()}")
        return self._call("evolve", text, self._task_check(domain, len(draft["actions"])), salt=f"evolve{index}")

