"""What an episode spent: dollars, tool wall-clock, policy generation time, tokens per model, calls per tool.

DESIGN.md section 4: cost = Σ over every model call (the orchestrator's own tokens included) of
price_in·prompt_tokens + price_out·completion_tokens, + sandbox seconds × $/s, + search fees. Latency is the
wall-clock of tool calls; the policy's own generation time is kept beside it (`policy_latency_s`), not in it.
A judge's spend is evaluation, not the policy's choice, so it is kept apart in `judge_cost_usd`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from orchestra_jax.env.prices import (
    ModelPrice,
    PriceError,
    PriceTable,
    Usage,
    default_price_table,
    load_price_table,
)

__all__ = [
    "Ledger",
    "ModelPrice",
    "PriceError",
    "PriceTable",
    "Usage",
    "default_price_table",
    "load_price_table",
]


def _merge(counts: Mapping[str, int], extra: Iterable[tuple[str, int]]) -> dict[str, int]:
    out = dict(counts)
    for key, n in extra:
        out[key] = out.get(key, 0) + n
    return out


@dataclasses.dataclass(frozen=True)
class Ledger:
    cost_usd: float = 0.0
    tool_latency_s: float = 0.0
    policy_latency_s: float = 0.0
    judge_cost_usd: float = 0.0
    sandbox_s: float = 0.0
    search_queries: int = 0
    prompt_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Per real model name (the orchestrator's own name included)."""
    completion_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tool_calls: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def add(
        self,
        *,
        cost_usd: float = 0.0,
        usage: Iterable[Usage] = (),
        tool: str | None = None,
        tool_latency_s: float = 0.0,
        policy_latency_s: float = 0.0,
        sandbox_s: float = 0.0,
        search_queries: int = 0,
        judge_cost_usd: float = 0.0,
    ) -> Ledger:
        """A new ledger with these amounts added; `cost_usd` is already priced (see `charge` to price here)."""
        usage = [Usage(*u) for u in usage]
        return Ledger(
            cost_usd=self.cost_usd + cost_usd,
            tool_latency_s=self.tool_latency_s + tool_latency_s,
            policy_latency_s=self.policy_latency_s + policy_latency_s,
            judge_cost_usd=self.judge_cost_usd + judge_cost_usd,
            sandbox_s=self.sandbox_s + sandbox_s,
            search_queries=self.search_queries + search_queries,
            prompt_tokens=_merge(self.prompt_tokens, ((u.model, u.prompt_tokens) for u in usage)),
            completion_tokens=_merge(self.completion_tokens, ((u.model, u.completion_tokens) for u in usage)),
            tool_calls=_merge(self.tool_calls, [(tool, 1)] if tool is not None else []),
        )

    def charge(
        self,
        prices: PriceTable,
        *,
        usage: Iterable[Usage] = (),
        sandbox_s: float = 0.0,
        search_queries: int = 0,
        search_kind: str = "local",
        tool: str | None = None,
        tool_latency_s: float = 0.0,
        policy_latency_s: float = 0.0,
    ) -> Ledger:
        """Price the usage with `prices` and add it (e.g. the orchestrator's own turn: usage + policy time)."""
        usage = [Usage(*u) for u in usage]
        cost = prices.cost(usage, sandbox_s=sandbox_s, search_queries=search_queries, search_kind=search_kind)
        return self.add(
            cost_usd=cost,
            usage=usage,
            tool=tool,
            tool_latency_s=tool_latency_s,
            policy_latency_s=policy_latency_s,
            sandbox_s=sandbox_s,
            search_queries=search_queries,
        )

    def add_tool_result(self, tool: str, result: Any) -> Ledger:
        """Book a `catalog.ToolResult` (already priced by its tool) as one call of `tool`."""
        return self.add(
            cost_usd=result.cost_usd,
            usage=result.usage,
            tool=tool,
            tool_latency_s=result.latency_s,
            sandbox_s=getattr(result, "sandbox_s", 0.0),
            search_queries=getattr(result, "search_queries", 0),
            judge_cost_usd=getattr(result, "judge_cost_usd", 0.0),
        )

    def merge(self, other: Ledger) -> Ledger:
        """Sum of two ledgers (e.g. concurrent tool calls of one turn)."""
        usage = [Usage(m, n, 0) for m, n in other.prompt_tokens.items()]
        usage += [Usage(m, 0, n) for m, n in other.completion_tokens.items()]
        out = self.add(
            cost_usd=other.cost_usd,
            usage=usage,
            tool_latency_s=other.tool_latency_s,
            policy_latency_s=other.policy_latency_s,
            sandbox_s=other.sandbox_s,
            search_queries=other.search_queries,
            judge_cost_usd=other.judge_cost_usd,
        )
        return dataclasses.replace(out, tool_calls=_merge(out.tool_calls, other.tool_calls.items()))

    @property
    def total_tokens(self) -> int:
        return sum(self.prompt_tokens.values()) + sum(self.completion_tokens.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "cost_usd": self.cost_usd,
            "tool_latency_s": self.tool_latency_s,
            "policy_latency_s": self.policy_latency_s,
            "judge_cost_usd": self.judge_cost_usd,
            "sandbox_s": self.sandbox_s,
            "search_queries": self.search_queries,
            "prompt_tokens": dict(self.prompt_tokens),
            "completion_tokens": dict(self.completion_tokens),
            "tool_calls": dict(self.tool_calls),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Ledger:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
