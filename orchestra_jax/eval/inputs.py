"""What a user hands `orchestra-jax eval` besides flags: the tools file and preference specs, validated at the edge.

The tools file is one JSON object: `endpoints` (llm_tools' format: name, base_url, model, api_key_env, ...), and
optionally `alias_map` (ToolOrchestra alias -> endpoint name, or "passthrough" for search), `prices` (a
price-table overlay: the policy's own entry is "orchestrator"), `judge` (the LLM judge's endpoint name),
`tau2_user` (the τ² user simulator's endpoint name) and `retriever_url` (a /retrieve server). Every problem is one
line naming the file and key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from orchestra_jax.env.preferences import Preference, PreferenceError
from orchestra_jax.env.prices import PriceError, PriceTable, default_price_table, price_table_from_json


class EvalUsageError(ValueError):
    """Bad eval input (a flag, a file, an endpoint name), as one line."""


@dataclasses.dataclass(frozen=True)
class ToolsFile:
    endpoints: dict[str, Any]
    alias_map: dict[str, str] | None
    prices: PriceTable
    judge: str | None
    tau2_user: str | None
    retriever_url: str | None


NAMED_PREFERENCES = {
    "default": Preference(),
    "accuracy": Preference(outcome=1.0),
    "cost": Preference(outcome=1.0, cost=1.0),
    "latency": Preference(outcome=1.0, latency=1.0),
    "balanced": Preference(outcome=1.0, cost=0.5, latency=0.5),
}


def parse_preference(spec: str) -> Preference | None:
    """A --preference value; None means 'each task keeps its own'."""
    if spec == "task":
        return None
    if spec in NAMED_PREFERENCES:
        return NAMED_PREFERENCES[spec]
    values: dict[str, float] = {}
    tools: list[tuple[str, float]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or number != number:
            raise EvalUsageError(f"--preference {spec!r}: {part!r} is not key=number")
        if key.startswith("tool."):
            tools.append((key[5:], number))
        elif key in ("outcome", "cost", "latency"):
            values[key] = number
        else:
            raise EvalUsageError(f"--preference {spec!r}: unknown key {key!r} (outcome, cost, latency, tool.NAME)")
    try:
        return Preference(tuple(tools), **values)
    except PreferenceError as e:
        raise EvalUsageError(f"--preference {spec!r}: {e}") from None


def load_tools_file(path: str | None) -> ToolsFile:
    from orchestra_jax.env.llm_tools import EndpointError, endpoints_from_json

    if path is None:
        return ToolsFile({}, None, default_price_table(), None, None, None)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalUsageError(f"--tools {path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EvalUsageError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise EvalUsageError(f"{path}: expected a JSON object")
    known = {"endpoints", "alias_map", "prices", "judge", "tau2_user", "retriever_url"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EvalUsageError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
    try:
        endpoints = endpoints_from_json(data.get("endpoints", []), path)
        prices = price_table_from_json(data.get("prices", {}), source=f"{path}: prices")
    except (EndpointError, PriceError) as e:
        raise EvalUsageError(str(e)) from None
    alias_map = data.get("alias_map")
    if alias_map is not None and not (isinstance(alias_map, dict) and all(isinstance(v, str) for v in alias_map.values())):
        raise EvalUsageError(f"{path}: alias_map must map alias names to endpoint names")
    for key in ("judge", "tau2_user"):
        if data.get(key) is not None and data[key] not in endpoints:
            raise EvalUsageError(f"{path}: {key} {data[key]!r} is not one of the endpoints {sorted(endpoints)}")
    return ToolsFile(endpoints, alias_map, prices, data.get("judge"), data.get("tau2_user"), data.get("retriever_url"))
