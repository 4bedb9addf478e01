"""The procedural backend: complete small domains from templates and seeded randomness, no LLM.

It goes through the same stages as the LLM teacher and its proposals meet the same validators: it does not
pre-check preconditions or uniqueness, so some records are rejected and some tasks are unsolvable or duplicated,
and the filter report shows it. Same seed, same output.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

from orchestra_jax.data.synth import stages
from orchestra_jax.data.synth.templates import TEMPLATES, DomainTemplate, WriteTemplate
from orchestra_jax.env.domain import Domain, ToolSpec


def derive_read_tools(template: DomainTemplate) -> list[dict]:
    """Read/search tools every domain gets: find the user by email, get any record by id, list a user's records,
    and find shared records (books, doctors) by their label."""
    tables = template.data_model["tables"]
    user = template.entity[template.user_table]
    tools = [{"name": f"find_{user}_by_email", "description": f"Find a {user} by email address.", "kind": "search",
              "table": template.user_table, "parameters": {"email": {"type": "string", "description": "email address"}},
              "match": {"email": "email"}}]
    for name, table in tables.items():
        entity, key = template.entity[name], table["key"]
        tools.append({"name": f"get_{entity}", "description": f"Get a {entity} by id.", "kind": "read", "table": name,
                      "parameters": {key: {"type": "string", "description": f"{entity} id"}}, "key_param": key})
        owner = table["fields"].get(template.owner_field)
        if name != template.user_table and owner and owner.get("ref") == template.user_table:
            tools.append({"name": f"list_{name}_of_{user}", "description": f"List the {name} of a {user}.",
                          "kind": "search", "table": name, "match": {template.owner_field: template.owner_field},
                          "parameters": {template.owner_field: {"type": "string", "description": f"{user} id"}}})
        elif name != template.user_table:
            label = template.labels[name]
            tools.append({"name": f"find_{entity}_by_{label}", "description": f"Find {name} by {label}.",
                          "kind": "search", "table": name, "match": {label: label},
                          "parameters": {label: {"type": "string", "description": label}}})
    return tools


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class ProceduralBackend:
    name = "procedural"

    def __init__(self, template: DomainTemplate, seed: int = 0):
        self.template, self.seed = template, seed

    @classmethod
    def for_domain(cls, domain: str, seed: int = 0) -> ProceduralBackend:
        if domain not in TEMPLATES:
            raise ValueError(f"the procedural backend has no domain {domain!r} (choose from {', '.join(TEMPLATES)})")
        return cls(TEMPLATES[domain], seed)

    def _rng(self, *parts: Any) -> random.Random:
        return random.Random("-".join(map(str, (self.seed, *parts))))

    # ------------------------------------------------------------------ environment stages

    def subjects(self, domain: str) -> list[str]:
        return list(self.template.subjects)

    def schema(self, domain: str, subjects: Sequence[str]) -> dict:
        return {"tables": {name: {"description": t["description"], "key": t["key"],
                                  "fields": {f: s["description"] for f, s in t["fields"].items()}}
                           for name, t in self.template.data_model["tables"].items()}}

    def data_model(self, domain: str, schema: Mapping) -> dict:
        return copy.deepcopy(dict(self.template.data_model))

    def records(self, domain: str, data_model: Mapping, db: Mapping, round_index: int, per_table: int) -> dict:
        rng = self._rng("records", round_index)
        working = {t: dict(rs) for t, rs in db.items()}
        proposal: dict[str, dict] = {}
        for table in stages.table_order(data_model):
            spec = data_model["tables"][table]
            for _ in range(per_table):
                key = f"{spec['key_prefix']}{len(working[table]) + 1:04d}"
                record = self.template.factories[table](rng, working, key)
                if record is not None:
                    proposal.setdefault(table, {})[key] = record
                    working[table][key] = record
        return proposal

    def tools(self, domain: str, data_model: Mapping) -> list[dict]:
        return derive_read_tools(self.template) + [copy.deepcopy(dict(w.tool)) for w in self.template.writes]

    # ------------------------------------------------------------------ task stages

    def intents(self, domain: str, subjects: Sequence[str], tools: Sequence[ToolSpec], count: int) -> list[str]:
        names = {t.name for t in tools}
        options = [f"write:{w.tool['name']}" for w in self.template.writes if w.tool["name"] in names]
        options += [f"lookup:{table}.{field}" for table, field in self.template.lookups]
        rng = self._rng("intents")
        intents: list[str] = []
        while len(intents) < count:
            batch = list(options)
            rng.shuffle(batch)
            intents += batch
        return intents[:count]

    def task(self, domain: Domain, intent: str, index: int) -> dict:
        draft = self._draft(domain, intent, self._rng("task", index), user_key=None)
        if draft is None:
            raise stages.StageFailed("task", f"no record fits intent {intent!r}")
        return draft

    def evolve(self, domain: Domain, draft: Mapping, index: int) -> dict:
        """Harder: a second request (another intent) from the same user, merged into one conversation."""
        rng = self._rng("evolve", index)
        email = draft["actions"][0]["arguments"].get("email")
        users = domain.db[self.template.user_table]
        user_key = next((k for k, u in users.items() if u.get("email") == email), None)
        options = self.intents(domain.name, (), domain.tools, len(domain.tools) + len(self.template.lookups))
        rng.shuffle(options)
        claimed = {(c["table"], c["key"], c["field"]) for c in draft["expected_changes"]}
        for intent in dict.fromkeys(options):
            extra = self._draft(domain, intent, rng, user_key=user_key) if user_key else None
            if extra is None or any((c["table"], c["key"], c["field"]) in claimed for c in extra["expected_changes"]):
                continue
            if all(a in draft["actions"] for a in extra["actions"]):
                continue
            scenario = dict(draft["user_scenario"])
            scenario["reason_for_call"] += " Also: " + extra["user_scenario"]["reason_for_call"]
            scenario["task_instructions"] += " Then: " + extra["user_scenario"]["reason_for_call"]
            return {"user_scenario": scenario,
                    "actions": list(draft["actions"]) + [a for a in extra["actions"] if a not in draft["actions"]],
                    "communicate_info": list(dict.fromkeys([*draft["communicate_info"], *extra["communicate_info"]])),
                    "nl_assertions": [*draft.get("nl_assertions", []), *extra["nl_assertions"]],
                    "expected_changes": [*draft["expected_changes"], *extra["expected_changes"]]}
        raise stages.StageFailed("evolve", "no second request fits this user")

    # ------------------------------------------------------------------ drafting

    def _draft(self, domain: Domain, intent: str, rng: random.Random, user_key: str | None) -> dict | None:
        kind, _, what = intent.partition(":")
        if kind == "write":
            write = next((w for w in self.template.writes if w.tool["name"] == what), None)
            if write is None:
                return None
            if write.tool["kind"] == "create":
                return self._create_draft(domain, write, rng, user_key)
            return self._update_draft(domain, write, rng, user_key)
        if kind == "lookup":
            table, _, field = what.partition(".")
            return self._lookup_draft(domain, table, field, rng, user_key)
        return None

    def _pick_record(self, domain: Domain, table: str, rng: random.Random, user_key: str | None):
        t = self.template
        records = sorted(domain.db.get(table, {}).items())
        if user_key is not None:
            records = [(k, r) for k, r in records
                       if (k == user_key if table == t.user_table else r.get(t.owner_field) == user_key)]
        if not records:
            return None, None
        key, record = rng.choice(records)
        owner_key = key if table == t.user_table else record.get(t.owner_field)
        return record, domain.db[t.user_table].get(owner_key)

    def _opening(self, user: Mapping, table: str) -> list[dict]:
        t = self.template
        entity = t.entity[t.user_table]
        actions = [{"name": f"find_{entity}_by_email", "arguments": {"email": user["email"]}}]
        if table != t.user_table:
            actions.append({"name": f"list_{table}_of_{entity}", "arguments": {t.owner_field: user[t.owner_field]}})
        return actions

    def _scenario(self, user: Mapping, reason: str, unknown: str) -> dict:
        return {"task_instructions": f"You are {user['name']}. {reason} Give your email if asked.",
                "reason_for_call": reason,
                "known_info": f"My name is {user['name']} and my email is {user['email']}.",
                "unknown_info": unknown}

    def _update_draft(self, domain, write: WriteTemplate, rng, user_key):
        table, key_param = write.tool["table"], write.tool["key_param"]
        record, user = self._pick_record(domain, table, rng, user_key)
        if record is None or user is None:
            return None
        args = {key_param: record[domain.data_model["tables"][table]["key"]], **write.args(rng, domain.db, record)}
        claims = []
        for effect in write.tool["effects"]:
            if "value" in effect or "param" in effect:
                value = effect["value"] if "value" in effect else args[effect["param"]]
            else:
                delta = effect["add_value"] if "add_value" in effect else args[effect["add_param"]]
                value = round((record[effect["field"]] or 0) + (-1 if effect.get("sign", 1) < 0 else 1) * delta, 2)
            claims.append({"table": table, "key": args[key_param], "field": effect["field"], "value": value})
        reason = write.phrase.format(**{**record, **args, "label": record[self.template.labels[table]]})
        return {"user_scenario": self._scenario(user, reason, f"the {self.template.entity[table]} id"),
                "actions": self._opening(user, table) + [{"name": write.tool["name"], "arguments": args}],
                "communicate_info": [],
                "nl_assertions": [f"{table} {c['key']}: {c['field']} becomes {c['value']}" for c in claims],
                "expected_changes": claims}

    def _create_draft(self, domain, write: WriteTemplate, rng, user_key):
        t = self.template
        _, user = self._pick_record(domain, t.user_table, rng, user_key)
        if user is None:
            return None
        owner_param = next(e["param"] for e in write.tool["effects"] if e["field"] == t.owner_field)
        args = {owner_param: user[t.owner_field], **write.args(rng, domain.db, user)}
        if set(args) != set(write.tool["parameters"]):
            return None
        table = write.tool["table"]
        claims = [{"table": table, "key": None, "field": e["field"],
                   "value": e["value"] if "value" in e else args[e["param"]]} for e in write.tool["effects"]]
        reason = write.phrase.format(**args)
        return {"user_scenario": self._scenario(user, reason, f"their {t.entity[t.user_table]} id"),
                "actions": self._opening(user, t.user_table) + [{"name": write.tool["name"], "arguments": args}],
                "communicate_info": [], "nl_assertions": [f"a new {t.entity[table]} exists for {user['name']}"],
                "expected_changes": claims}

    def _lookup_draft(self, domain, table: str, field: str, rng, user_key):
        record, user = self._pick_record(domain, table, rng, user_key)
        if record is None or user is None:
            return None
        t = self.template
        words = field.replace("_", " ")
        if table == t.user_table:
            reason = f"Please tell me my current {words}."
        else:
            reason = f"What is the {words} of my {t.entity[table]} {record[t.labels[table]]}?"
        value = _fmt(record[field])
        return {"user_scenario": self._scenario(user, reason, f"the {words}"),
                "actions": self._opening(user, table), "communicate_info": [value],
                "nl_assertions": [f"the agent tells the user that the {words} is {value}"], "expected_changes": []}
