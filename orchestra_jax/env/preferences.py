"""A user's preference over tools, outcome, cost and latency: the P of ToolOrchestra's reward (DESIGN.md §4).

P = [p_t1 … p_tn, p_outcome, p_cost, p_latency], each in [0, 1]. A correct rollout earns M̂·P, where M̂ holds the
group-normalised tool-call counts, the outcome, −cost and −latency; so p_cost > 0 pays for cheap rollouts and
p_t > 0 pays for calling tool t. The policy sees P as a system-prompt instruction (`render_instruction`), and
each task draws its own P from a seeded distribution (`sample_preference`, `preference_for_task`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

Distribution = Literal["fixed", "uniform", "dirichlet"]


class PreferenceError(ValueError):
    """A preference value or distribution setting out of range, phrased as one line."""


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PreferenceError(f"preference {name}: expected a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise PreferenceError(f"preference {name}: {value!r} is outside [0, 1]")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Preference:
    tools: tuple[tuple[str, float], ...] = ()
    """(tool name, weight) in the catalog's tool order."""
    outcome: float = 1.0
    cost: float = 0.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        tools = tuple((str(name), _check_weight(f"tool {name!r}", w)) for name, w in self.tools)
        object.__setattr__(self, "tools", tools)
        for name in ("outcome", "cost", "latency"):
            object.__setattr__(self, name, _check_weight(name, getattr(self, name)))

    def tool_weight(self, name: str) -> float:
        return dict(self.tools).get(name, 0.0)

    def vector(self, tool_names: Sequence[str] | None = None) -> np.ndarray:
        """[p_t1 … p_tn, p_outcome, p_cost, p_latency] as float32; tools absent from P weigh 0."""
        names = [n for n, _ in self.tools] if tool_names is None else list(tool_names)
        return np.array(
            [self.tool_weight(n) for n in names] + [self.outcome, self.cost, self.latency], np.float32
        )

    @classmethod
    def from_vector(cls, tool_names: Sequence[str], vector: Sequence[float]) -> Preference:
        values = [float(v) for v in vector]
        if len(values) != len(tool_names) + 3:
            raise PreferenceError(
                f"preference vector has {len(values)} entries, expected {len(tool_names) + 3}"
            )
        return cls(tuple(zip(tool_names, values[:-3], strict=True)), *values[-3:])

    def to_json(self) -> dict[str, Any]:
        return {
            "tools": dict(self.tools),
            "outcome": self.outcome,
            "cost": self.cost,
            "latency": self.latency,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preference:
        if not isinstance(data, Mapping):
            raise PreferenceError(f"preference: expected an object, got {type(data).__name__}")
        unknown = set(data) - {"tools", "outcome", "cost", "latency"}
        if unknown:
            raise PreferenceError(f"preference: unknown key {sorted(unknown)[0]!r}")
        tools = data.get("tools", {})
        if not isinstance(tools, Mapping):
            raise PreferenceError("preference tools: expected an object of tool name -> weight")
        return cls(
            tuple(tools.items()), data.get("outcome", 1.0), data.get("cost", 0.0), data.get("latency", 0.0)
        )


def _level(weight: float) -> str:
    if weight == 0.0:
        return "does not matter"
    return "low" if weight < 1 / 3 else ("medium" if weight < 2 / 3 else "high")


def render_instruction(pref: Preference) -> str:
    """The system-prompt text that tells the policy what this user wants (numbers and words, one per line)."""
    lines = [
        "User preference (weights from 0 = does not matter to 1 = matters most):",
        f"- answer correctly: {pref.outcome:.2f} ({_level(pref.outcome)})",
        f"- keep the dollar cost low: {pref.cost:.2f} ({_level(pref.cost)})",
        f"- keep the latency low: {pref.latency:.2f} ({_level(pref.latency)})",
    ]
    lines += [f"- use the {name} tool: {w:.2f} ({_level(w)})" for name, w in pref.tools if w > 0]
    lines.append("Only a correct final answer earns credit; among correct answers, follow these preferences.")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PreferenceDistribution:
    kind: Distribution = "uniform"
    fixed: Preference = dataclasses.field(default_factory=Preference)
    """The preference `kind='fixed'` returns (tool names are taken from the call when it lists none)."""
    alpha: float = 1.0
    """Dirichlet concentration over the K+3 components."""
    tool_keep_prob: float = 1.0
    """Probability that each tool weight is drawn at all (else 0), so most users name only a few tools."""

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "dirichlet"):
            raise PreferenceError(
                f"preference distribution kind={self.kind!r}: expected fixed|uniform|dirichlet"
            )
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise PreferenceError(f"preference distribution alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.tool_keep_prob <= 1.0:
            raise PreferenceError(
                f"preference distribution tool_keep_prob={self.tool_keep_prob!r}: outside [0, 1]"
            )


def sample_preference(
    rng: np.random.Generator, tool_names: Sequence[str], dist: PreferenceDistribution | None = None
) -> Preference:
    dist = dist or PreferenceDistribution()
    k = len(tool_names)
    if dist.kind == "fixed":
        return Preference.from_vector(tool_names, dist.fixed.vector(tool_names))
    if dist.kind == "uniform":
        values = rng.uniform(0.0, 1.0, size=k + 3)
    else:
        values = rng.dirichlet(np.full(k + 3, dist.alpha))
    keep = rng.uniform(size=k) < dist.tool_keep_prob
    values[:k] = np.where(keep, values[:k], 0.0)
    return Preference.from_vector(tool_names, np.clip(values, 0.0, 1.0))


def sample_preferences(
    n: int, tool_names: Sequence[str], dist: PreferenceDistribution | None = None, *, seed: int = 0
) -> list[Preference]:
    rng = np.random.default_rng(seed)
    return [sample_preference(rng, tool_names, dist) for _ in range(n)]


def preference_for_task(
    task_id: str, tool_names: Sequence[str], dist: PreferenceDistribution | None = None, *, seed: int = 0
) -> Preference:
    """The same task id and seed give the same preference in any process (no Python hash randomisation)."""
    digest = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "little")
    return sample_preference(np.random.default_rng([seed, digest]), tool_names, dist)
