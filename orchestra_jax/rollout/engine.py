"""The rollout engine interface: token ids in, sampled token ids and their log-probs out.

Episodes, evaluation and data synthesis talk only to `RolloutEngine`. Two implementations exist: the embedded
JAX sampler (`rollout.sampler.EmbeddedEngine`) and SGLang servers over HTTP (`rollout.sglang_client`). Both take
SGLang's sampling parameter names, so one `SamplingParams` value means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]


class RequestError(ValueError):
    """A request the engine cannot serve (bad sampling params, empty or too long prompt, bad token id)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, named as SGLang names them (`sampling_params` of /generate).

    temperature 0 means greedy. top_k -1 and top_p 1 and min_p 0 switch those truncations off. `seed` makes a
    request reproducible regardless of which other requests share its batch; None draws a fresh seed.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self, where: str = "sampling_params") -> SamplingParams:
        """Return self, or raise RequestError naming the bad field."""

        def bad(name: str, value: Any, why: str) -> RequestError:
            return RequestError(f"{where}.{name}={value!r}: {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise bad("top_k", self.top_k, "must be -1 (off) or an integer >= 1")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be non-negative integers")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "must be non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "must be an integer in [0, 2**63)")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "must be a boolean")
        return self

    def to_sglang(self) -> dict[str, Any]:
        """The `sampling_params` dict of SGLang's /generate; every field is sent (server defaults differ)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "stop_token_ids": list(self.stop_token_ids),
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": False,
        }
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out

    @classmethod
    def from_sglang(cls, params: Mapping[str, Any] | None, where: str = "sampling_params") -> SamplingParams:
        """Parse SGLang's `sampling_params`; unknown keys and unsupported values raise RequestError."""
        if params is not None and not isinstance(params, Mapping):
            raise RequestError(f"{where}: must be an object, got {type(params).__name__}")
        params = dict(params or {})
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key in _FIELD_NAMES:
                kwargs[key] = value
            elif key in ("sampling_seed", "seed"):
                kwargs["seed"] = value
            elif key in _ACCEPTED_DEFAULTS:
                if value != _ACCEPTED_DEFAULTS[key] and value is not None:
                    raise RequestError(
                        f"{where}.{key}={value!r}: only {_ACCEPTED_DEFAULTS[key]!r} is supported"
                    )
            elif key not in _IGNORED:
                raise RequestError(f"{where}: unknown sampling parameter {key!r}")
        for key in ("stop", "stop_token_ids"):
            value = kwargs.get(key)
            if value is None:
                kwargs.pop(key, None)
            elif isinstance(value, str) and key == "stop":
                kwargs[key] = (value,)
            elif isinstance(value, list | tuple):
                kwargs[key] = tuple(value)
            else:
                raise RequestError(f"{where}.{key}={value!r}: must be a list")
        if kwargs.get("max_new_tokens", 1) is None:
            kwargs.pop("max_new_tokens")
        for key in ("temperature", "top_p", "min_p"):
            if isinstance(kwargs.get(key), int) and not isinstance(kwargs.get(key), bool):
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs).validate(where)


_FIELD_NAMES = {f.name for f in dataclasses.fields(SamplingParams)} - {"seed"}
# SGLang sampling fields we accept only at their neutral value.
_ACCEPTED_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "min_new_tokens": 0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
}
# SGLang fields that only change how text is shown, not which tokens are sampled.
_IGNORED = {
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "custom_params",
    "logit_bias",
}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    rid: str


@dataclass(frozen=True)
class Completion:
    """One finished request.

    `logprobs[i]` is the log-probability of `output_ids[i]` under the softmax of the temperature-scaled logits
    (temperature 0 counts as 1), before top-k/top-p/min-p truncation: the quantity a trainer recomputes.
    `cached_tokens` counts prompt tokens whose KV came from an earlier request (prefix reuse).
    """

    rid: str
    output_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    weight_version: str
    latency_s: float
    cached_tokens: int = 0


@runtime_checkable
class RolloutEngine(Protocol):
    """What episodes need from a token generator. Requests from many concurrent callers are batched inside."""

    weight_version: str

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        """Completions in the order of `requests`; raises RequestError for a malformed request."""
        ...

    async def update_weights(self, params: Any, version: str) -> None:
        """Serve `params` (a models pytree) from now on, tagging completions with `version`."""
        ...

    async def health(self) -> bool: ...


def check_prompt(request: GenerateRequest, vocab_size: int, max_context: int) -> None:
    """Raise RequestError when a prompt is empty, too long for the context, or holds ids outside the vocab."""
    ids = request.prompt_ids
    if not ids:
        raise RequestError(f"request {request.rid!r}: empty prompt")
    if len(ids) >= max_context:
        raise RequestError(
            f"request {request.rid!r}: prompt of {len(ids)} tokens does not fit the context of {max_context}"
        )
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise RequestError(
                f"request {request.rid!r}: prompt_ids[{i}]={t!r} is not a token id in [0, {vocab_size})"
            )
