"""Verification by execution: tools run on the database, gold actions execute and make the claimed changes.

ToolOrchestra's released pipeline never executes a task's golden actions; here every task is replayed in the
domain environment before it is emitted. A task draft is dropped for exactly one reason (the first that
applies, in `REASONS` order), so the report adds up: candidates == kept + sum(removed.values()).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from orchestra_jax.data.synth.llm import schema_error
from orchestra_jax.env.domain import Action, Domain, DomainTask, ToolSpec, execute, replay

REASONS = ("generation_failed", "malformed", "unsolvable", "claim_mismatch", "info_unobservable", "trivial",
           "near_duplicate")

TASK_DRAFT_SCHEMA = {
    "type": "object",
    "properties": {
        "user_scenario": {"type": "object", "properties": {
            k: {"type": "string", "minLength": 1 if k == "reason_for_call" else 0}
            for k in ("task_instructions", "reason_for_call", "known_info", "unknown_info")},
            "required": ["reason_for_call", "known_info"]},
        "actions": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "arguments": {"type": "object"}}, "required": ["name", "arguments"]}},
        "communicate_info": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "nl_assertions": {"type": "array", "items": {"type": "string"}},
        "expected_changes": {"type": "array", "items": {"type": "object", "properties": {
            "table": {"type": "string"}, "key": {"type": ["string", "null"]}, "field": {"type": "string"},
            "value": {}}, "required": ["table", "key", "field", "value"]}},
    },
    "required": ["user_scenario", "actions", "communicate_info", "expected_changes"],
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """`reason` None means the draft passed; `detail` says why not in one line."""

    reason: str | None
    detail: str = ""


def _close(a: Any, b: Any) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers:
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def changed_records(before: Mapping, after: Mapping) -> dict[str, dict[str, bool]]:
    """table -> {key: is_new} for every record that differs between two databases."""
    diff: dict[str, dict[str, bool]] = {}
    for table, records in after.items():
        old = before.get(table, {})
        for key, record in records.items():
            if key not in old or old[key] != record:
                diff.setdefault(table, {})[key] = key not in old
    return diff


def check_claims(before: Mapping, after: Mapping, claims: Sequence[Mapping]) -> str | None:
    """Every claimed field holds in `after`, and every changed record is covered by a claim."""
    diff = changed_records(before, after)
    covered: set[tuple[str, str]] = set()
    new_claims: dict[str, list[Mapping]] = {}
    for claim in claims:
        table, key = claim["table"], claim["key"]
        if key is None:
            new_claims.setdefault(table, []).append(claim)
            continue
        record = after.get(table, {}).get(key)
        if record is None or key not in diff.get(table, {}):
            return f"claimed change to {table} {key} did not happen"
        if not _close(record.get(claim["field"]), claim["value"]):
            return f"{table} {key} {claim['field']} is {record.get(claim['field'])!r}, claimed {claim['value']!r}"
        covered.add((table, key))
    for table, group in new_claims.items():
        fresh = [k for k, is_new in diff.get(table, {}).items() if is_new and (table, k) not in covered]
        match = next((k for k in fresh if all(_close(after[table][k].get(c["field"]), c["value"]) for c in group)), None)
        if match is None:
            return f"no new {table} record with the claimed fields {[c['field'] for c in group]}"
        covered.add((table, match))
    unclaimed = [f"{t} {k}" for t, keys in diff.items() for k in keys if (t, k) not in covered]
    return f"unclaimed changes: {', '.join(unclaimed[:3])}" if unclaimed else None


def check_task(domain: Domain, draft: Any) -> Verdict:
    """Structure, gold-action execution, claimed state change, observable information, non-triviality."""
    error = schema_error(draft, TASK_DRAFT_SCHEMA)
    if error:
        return Verdict("malformed", error)
    tool_map = domain.tool_map
    unknown = [a["name"] for a in draft["actions"] if a["name"] not in tool_map]
    if unknown:
        return Verdict("malformed", f"unknown tool(s) {unknown}")
    if not draft["actions"]:
        return Verdict("trivial", "no gold actions")
    final_db, outcomes = replay(domain, [Action(a["name"], a["arguments"]) for a in draft["actions"]])
    for i, outcome in enumerate(outcomes):
        if outcome.error:
            return Verdict("unsolvable", f"gold action {i} ({draft['actions'][i]['name']}) failed: {outcome.error}")
    error = check_claims(domain.db, final_db, draft["expected_changes"])
    if error:
        return Verdict("claim_mismatch", error)
    observed = " ".join(o.observation for o in outcomes).lower().replace(",", "")
    hidden = [i for i in draft["communicate_info"] if i.lower().replace(",", "") not in observed]
    if hidden:
        return Verdict("info_unobservable", f"{hidden[0]!r} appears in no gold tool output")
    if not changed_records(domain.db, final_db) and not draft["communicate_info"]:
        return Verdict("trivial", "no state change and nothing to communicate")
    return Verdict(None)


def probe_tools(domain: Domain, max_records: int = 8) -> dict[str, str | None]:
    """Run every tool on real records: tool name -> None if some call succeeded, else the last error."""
    results: dict[str, str | None] = {}
    for tool in domain.tools:
        error = "no record to call it on"
        for arguments in _sample_arguments(domain, tool, max_records):
            outcome = execute(domain.data_model, domain.tool_map, domain.db, tool.name, arguments)
            error = outcome.error
            if error is None:
                break
        results[tool.name] = error
    return results


def _sample_arguments(domain: Domain, tool: ToolSpec, limit: int):
    """Arguments built from existing records: key -> the record's key, match/precondition params -> its fields."""
    records = list(domain.db.get(tool.table, {}).items())[:limit] or [(None, {})]
    fields = domain.data_model["tables"][tool.table]["fields"]
    for key, record in records:
        arguments = {}
        for pname, spec in tool.parameters.items():
            source = next((f for f, p in tool.match.items() if p == pname), None)
            ref_table = next((fields[e["field"]].get("ref") for e in tool.effects if e.get("param") == pname), None)
            if pname == tool.key_param:
                arguments[pname] = key
            elif source is not None:
                arguments[pname] = record.get(source)
            elif ref_table:
                arguments[pname] = next(iter(domain.db.get(ref_table, {})), "")
            elif "enum" in spec:
                arguments[pname] = spec["enum"][0]
            else:
                arguments[pname] = {"string": "probe", "integer": 1, "number": 1.0, "boolean": True}[spec["type"]]
        yield arguments


# ----------------------------------------------------------------------------------------------- near-duplicates


def minhash_signatures(texts: Sequence[str], num_perm: int = 64, shingle: int = 3, seed: int = 0) -> np.ndarray:
    """[N, num_perm] MinHash signatures of word shingles (universal hashing mod a Mersenne prime)."""
    prime = (1 << 61) - 1
    rng = np.random.default_rng(seed)
    a = rng.integers(1, prime, num_perm, dtype=np.uint64).astype(object)
    b = rng.integers(0, prime, num_perm, dtype=np.uint64).astype(object)
    signatures = np.zeros((len(texts), num_perm), dtype=np.uint64)
    for i, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower()) or [""]
        grams = {" ".join(words[j:j + shingle]) for j in range(max(1, len(words) - shingle + 1))}
        hashes = [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams]
        signatures[i] = [min((ai * h + bi) % prime for h in hashes) for ai, bi in zip(a, b, strict=True)]
    return signatures


def near_duplicate_mask(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64) -> list[bool]:
    """True for each text whose estimated Jaccard similarity to an earlier kept text is >= threshold."""
    signatures = minhash_signatures(texts, num_perm)
    kept: list[int] = []
    mask = []
    for i in range(len(texts)):
        dup = any(np.mean(signatures[i] == signatures[j]) >= threshold for j in kept)
        mask.append(dup)
        if not dup:
            kept.append(i)
    return mask


def task_fingerprint(draft: Mapping) -> str:
    """The text compared for near-duplicates: the request plus the gold action calls."""
    scenario = draft["user_scenario"]
    calls = " ".join(f"{a['name']} {json.dumps(a['arguments'], sort_keys=True)}" for a in draft["actions"])
    return f"{scenario.get('reason_for_call', '')} {scenario.get('known_info', '')} {calls}"


# ----------------------------------------------------------------------------------------------- the filter


@dataclasses.dataclass(frozen=True)
class FilterReport:
    candidates: int
    kept: int
    removed: Mapping[str, int]
    examples: Mapping[str, tuple[str, ...]]

    @property
    def adds_up(self) -> bool:
        return self.candidates == self.kept + sum(self.removed.values())

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "kept": self.kept, "removed": dict(self.removed),
                "examples": {k: list(v) for k, v in self.examples.items()}, "adds_up": self.adds_up}


def filter_tasks(domain: Domain, drafts: Sequence[tuple[str, Any]], *, dedup_threshold: float = 0.8,
                 verdicts: Mapping[str, Verdict] | None = None) -> tuple[list[tuple[str, dict]], FilterReport]:
    """Drafts are (task id, draft or None when generation failed); returns the survivors and the report.
    `verdicts` may carry an earlier reason for an id (e.g. why generation failed)."""
    removed = {r: 0 for r in REASONS}
    examples: dict[str, list[str]] = {r: [] for r in REASONS}

    def drop(reason: str, task_id: str, detail: str) -> None:
        removed[reason] += 1
        if len(examples[reason]) < 3:
            examples[reason].append(f"{task_id}: {detail}"[:300])

    passing: list[tuple[str, dict]] = []
    for task_id, draft in drafts:
        verdict = (verdicts or {}).get(task_id)
        if draft is None:
            drop("generation_failed", task_id, verdict.detail if verdict else "no draft")
            continue
        verdict = check_task(domain, draft)
        if verdict.reason:
            drop(verdict.reason, task_id, verdict.detail)
        else:
            passing.append((task_id, draft))
    mask = near_duplicate_mask([task_fingerprint(d) for _, d in passing], dedup_threshold) if passing else []
    kept = []
    for (task_id, draft), dup in zip(passing, mask, strict=True):
        if dup:
            drop("near_duplicate", task_id, "similar to an earlier task")
        else:
            kept.append((task_id, draft))
    report = FilterReport(len(drafts), len(kept), {r: n for r, n in removed.items()},
                          {r: tuple(e) for r, e in examples.items() if e})
    return kept, report


def difficulty_filter(task_ids: Sequence[str], pass_rate: Callable[[str], float]) -> tuple[list[str], dict[str, float]]:
    """Optional: keep tasks a reference policy solves sometimes (0 < pass rate < 1 over its k tries)."""
    rates = {t: float(pass_rate(t)) for t in task_ids}
    return [t for t in task_ids if 0.0 < rates[t] < 1.0], rates


def to_domain_task(task_id: str, draft: Mapping) -> DomainTask:
    reward_basis = ("DB", "COMMUNICATE")
    return DomainTask(task_id, dict(draft["user_scenario"]),
                      tuple(Action(a["name"], dict(a["arguments"])) for a in draft["actions"]),
                      tuple(draft["communicate_info"]), tuple(draft.get("nl_assertions", ())), reward_basis)
