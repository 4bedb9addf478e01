"""The values an episode consumes and produces: `Task` in, `Trajectory` out, shaped by `EpisodeConfig`.

A trajectory carries everything the RL step needs and nothing it must recompute from text: exact token ids,
the loss mask (1 on ids the policy sampled), the engine's behaviour log-probs aligned with those ids, the
weight version that produced them, the ledger (cost and latency), the outcome and the tool-call counts.

Training samples live in `samples`. In `history` mode an episode is one growing conversation, so there is one
sample. In `context` mode (ToolOrchestra's QA style) each turn's prompt is rebuilt from the problem and the
documents and code results gathered so far, so each turn is its own sample; the trainer treats every sample of
a trajectory as carrying the trajectory's reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from orchestra_jax.env.ledger import Ledger
from orchestra_jax.env.preferences import Preference

PromptMode = Literal["history", "context"]
FinishReason = Literal["answer", "final_text", "user_stop", "max_turns", "context_full", "engine_error"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One problem: the question, the reference answer, the tools it may use and the user's preference."""

    id: str
    question: str
    answer: str | None = None
    tools: tuple[str, ...] = ()
    """Names of the catalog tools the policy is offered; empty means every tool of the catalog."""
    preference: Preference = dataclasses.field(default_factory=Preference)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "tools": list(self.tools),
            "preference": self.preference.to_json(),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        return cls(
            id=str(data["id"]),
            question=str(data["question"]),
            answer=data.get("answer"),
            tools=tuple(data.get("tools", ())),
            preference=Preference.from_json(data.get("preference") or {}),
            metadata=dict(data.get("metadata", {})),
        )


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """How one episode is played. Sampling fields mean what rollout.engine.SamplingParams says they mean."""

    mode: PromptMode = "history"
    max_turns: int = 4
    """Generation rounds per episode (each policy turn counts, whatever it did)."""
    max_new_tokens: int = 128
    max_context: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    """Base seed: each request's seed derives from it, the task id, the rollout index and the turn."""
    enable_thinking: bool = False
    """Qwen3's thinking switch; off puts an empty <think></think> in each generation prompt."""
    family: str = "qwen3"
    system_prompt: str = "You are good at using tools."
    max_calls_per_turn: int = 4
    policy_model: str = "orchestrator"
    """Name under which the orchestrator's own tokens are priced (a PriceTable entry)."""
    policy_price_in: float = 0.2
    policy_price_out: float = 0.2
    """Dollars per million tokens of the orchestrator, used when the price table has no `policy_model` entry."""
    max_observation_chars: int = 2000


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sequence: prompt and generated ids with the mask and behaviour log-probs aligned to them."""

    token_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    weight_version: str
    turn_spans: tuple[tuple[int, int], ...] = ()
    """[start, end) of each policy turn's sampled ids in `token_ids`, in turn order."""
    turn_indices: tuple[int, ...] = ()
    """The episode turn each span belongs to (context mode: one turn per sample)."""

    def without_turns(self, drop: set[int]) -> Sample:
        """This sample with the loss mask zeroed on the given episode turns (the malformed-turn filter)."""
        mask = list(self.loss_mask)
        for (start, end), turn in zip(self.turn_spans, self.turn_indices, strict=True):
            if turn in drop:
                mask[start:end] = [0] * (end - start)
        return dataclasses.replace(self, loss_mask=tuple(mask))


@dataclasses.dataclass(frozen=True)
class Turn:
    """What happened in one policy turn, for logs and notebooks."""

    text: str
    calls: tuple[tuple[str, Mapping[str, Any]], ...]
    observations: tuple[str, ...]
    format_errors: tuple[str, ...]
    user_reply: str | None = None


@dataclasses.dataclass(frozen=True)
class Trajectory:
    task_id: str
    group_id: int
    samples: tuple[Sample, ...]
    weight_version: str
    """Version of the weights that produced the first generated token (the stalest)."""
    ledger: Ledger
    correct: bool
    answer: str | None
    tool_counts: Mapping[str, int]
    turns: tuple[Turn, ...]
    format_errors: int
    """Policy turns that were not well-formed (bad tool-call syntax, unknown tool, bad arguments, too many calls)."""
    malformed_turns: tuple[bool, ...]
    """Per policy turn: True when that turn was not well formed (the RL filter drops its tokens)."""
    preference: tuple[float, ...]
    """[p_t1 … p_tn, p_outcome, p_cost, p_latency] over `tool_names`."""
    tool_names: tuple[str, ...]
    finish_reason: FinishReason
    error: str | None = None
    weight_versions: tuple[str, ...] = ()

    @property
    def outcome(self) -> bool:
        return self.correct

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The whole conversation in history mode (the last turn's sequence in context mode)."""
        return self.samples[-1].token_ids if self.samples else ()

    @property
    def loss_mask(self) -> tuple[int, ...]:
        return self.samples[-1].loss_mask if self.samples else ()

    @property
    def behaviour_logprobs(self) -> tuple[float, ...]:
        return self.samples[-1].behaviour_logprobs if self.samples else ()

    def training_samples(self, drop_malformed_turns: bool = True) -> list[Sample]:
        """Samples for the trainer; with the filter on, tokens of turns that were not well formed get mask 0.

        Samples left with no trainable token are dropped.
        """
        drop = {i for i, bad in enumerate(self.malformed_turns) if bad} if drop_malformed_turns else set()
        out = [s.without_turns(drop) if drop else s for s in self.samples]
        return [s for s in out if any(s.loss_mask)]

    @property
    def has_valid_answer(self) -> bool:
        return self.answer is not None and bool(self.answer.strip())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record (trajectories/step_N.jsonl)."""
        return {
            "task_id": self.task_id,
            "group_id": self.group_id,
            "weight_version": self.weight_version,
            "correct": self.correct,
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "tool_counts": dict(self.tool_counts),
            "format_errors": self.format_errors,
            "malformed_turns": list(self.malformed_turns),
            "weight_versions": list(self.weight_versions),
            "preference": list(self.preference),
            "tool_names": list(self.tool_names),
            "ledger": self.ledger.to_json(),
            "turns": [
                {
                    "text": t.text,
                    "calls": [{"name": n, "arguments": dict(a)} for n, a in t.calls],
                    "observations": list(t.observations),
                    "format_errors": list(t.format_errors),
                    "user_reply": t.user_reply,
                }
                for t in self.turns
            ],
            "samples": [
                {
                    "token_ids": list(s.token_ids),
                    "loss_mask": list(s.loss_mask),
                    "behaviour_logprobs": list(s.behaviour_logprobs),
                    "weight_version": s.weight_version,
                    "turn_spans": [list(span) for span in s.turn_spans],
                    "turn_indices": list(s.turn_indices),
                }
                for s in self.samples
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Trajectory:
        """Inverse of `to_json` (notebooks and SFT read trajectories back from JSONL)."""
        turns = tuple(
            Turn(
                t["text"],
                tuple((c["name"], c["arguments"]) for c in t["calls"]),
                tuple(t["observations"]),
                tuple(t["format_errors"]),
                t.get("user_reply"),
            )
            for t in data["turns"]
        )
        samples = tuple(
            Sample(
                tuple(s["token_ids"]),
                tuple(s["loss_mask"]),
                tuple(s["behaviour_logprobs"]),
                s["weight_version"],
                tuple(tuple(span) for span in s.get("turn_spans", ())),
                tuple(s.get("turn_indices", ())),
            )
            for s in data["samples"]
        )
        return cls(
            task_id=data["task_id"],
            group_id=data["group_id"],
            samples=samples,
            weight_version=data["weight_version"],
            ledger=Ledger.from_json(data["ledger"]),
            correct=data["correct"],
            answer=data["answer"],
            tool_counts=dict(data["tool_counts"]),
            turns=turns,
            format_errors=data["format_errors"],
            malformed_turns=tuple(data.get("malformed_turns", ())),
            preference=tuple(data["preference"]),
            tool_names=tuple(data["tool_names"]),
            finish_reason=data["finish_reason"],
            error=data.get("error"),
            weight_versions=tuple(data.get("weight_versions", ())),
        )


def request_id(task_id: str, group_id: int, rollout: int, turn: int) -> str:
    """The engine request id of one policy turn: '<task_id>#<group>.<rollout>@<turn>'."""
    return f"{task_id}#{group_id}.{rollout}@{turn}"


def parse_request_id(rid: str) -> tuple[str, int, int, int]:
    """Inverse of `request_id`; raises ValueError on an id it did not make."""
    head, _, turn = rid.rpartition("@")
    task_id, _, numbers = head.rpartition("#")
    group, _, rollout = numbers.partition(".")
    try:
        return task_id, int(group), int(rollout), int(turn)
    except ValueError:
        raise ValueError(f"request id {rid!r} is not '<task>#<group>.<rollout>@<turn>'") from None
