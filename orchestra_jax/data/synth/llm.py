"""A structured-output client for any OpenAI-compatible chat endpoint, for the synthesis stages.

Each call asks for JSON matching a schema (through `response_format` where the endpoint takes it, and always
spelled out in the prompt), validates the reply with jsonschema plus an optional semantic check, and on
failure retries with the validation error appended to the conversation. Successful replies are cached on disk,
keyed by everything that determines the request, so a rerun resumes where an interrupted one stopped. A call
that still fails is recorded (stage, error, reply excerpt) and returned as a failure for the caller to skip.
The API key comes from an environment variable and never reaches logs or the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import jsonschema

from orchestra_jax.env.domain import write_json_atomic

Message = Mapping[str, str]
Check = Callable[[Any], str | None]  # returns an error message, or None when the value is acceptable


class LLMError(RuntimeError):
    """The endpoint cannot be used at all (unreachable, unknown model, auth refused): stop before any work."""


@dataclasses.dataclass(frozen=True)
class LLMSettings:
    endpoint: str  # the OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None: the first model the endpoint lists
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 2048
    max_attempts: int = 3
    timeout_s: float = 120.0
    price_in_per_mtok: float = 0.0  # USD per million prompt tokens, for the usage report
    price_out_per_mtok: float = 0.0


@dataclasses.dataclass(frozen=True)
class StageCall:
    """One structured call's result: `value` when valid, else `error` (after `attempts` tries)."""

    stage: str
    value: Any
    error: str | None
    attempts: int
    cached: bool
    last_value: Any = None  # the last parsed reply of a failed call (for classifying why it failed)


def extract_json(text: str) -> Any:
    """The JSON value in a reply: the whole text, a ```json fence, or the outermost {...} / [...] span."""
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [text] + ([fence.group(1)] if fence else [])
    for open_, close in ("{}", "[]"):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    last: json.JSONDecodeError | None = None
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as e:
            last = e
    raise ValueError(f"reply is not JSON ({last.msg if last else 'empty'})")


def schema_error(value: Any, schema: Mapping) -> str | None:
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is None:
        return None
    path = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
    return "at $" + path + f": {error.message[:300]}"


def _run_check(check: Check | None, value: Any) -> str | None:
    if check is None:
        return None
    try:
        return check(value)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"


class StructuredClient:
    """Calls one endpoint; keeps a usage ledger (calls, attempts, tokens, cache hits, failures) per stage."""

    def __init__(self, settings: LLMSettings, cache_dir: str | os.PathLike, *, transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.cache_dir = pathlib.Path(cache_dir)
        headers = {}
        key = os.environ.get(settings.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(base_url=settings.endpoint.rstrip("/") + "/", headers=headers,
                                  timeout=settings.timeout_s, transport=transport)
        self._structured = True
        self.model = settings.model
        self.usage: dict[str, dict[str, float]] = {}
        self.failures: list[dict[str, Any]] = []

    def close(self) -> None:
        self._http.close()

    def check_endpoint(self) -> str:
        """Fail fast with one line when the endpoint is unusable; returns the model name to use."""
        try:
            response = self._http.get("models", timeout=min(self.settings.timeout_s, 10.0))
        except httpx.HTTPError as e:
            raise LLMError(f"cannot reach LLM endpoint {self.settings.endpoint}: {type(e).__name__}: {e}") from None
        if response.status_code in (401, 403):
            raise LLMError(f"LLM endpoint {self.settings.endpoint} refused the API key (HTTP {response.status_code};"
                           f" set ${self.settings.api_key_env})")
        if response.status_code != 200:
            hint = "" if self.settings.endpoint.rstrip("/").endswith("/v1") else " (the base URL usually ends in /v1)"
            raise LLMError(f"LLM endpoint {self.settings.endpoint}: GET /models gave HTTP {response.status_code}{hint}")
        try:
            models = [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise LLMError(f"LLM endpoint {self.settings.endpoint}: /models did not return an OpenAI model list") from None
        if self.model is None:
            if not models:
                raise LLMError(f"LLM endpoint {self.settings.endpoint} lists no models; pass --model")
            self.model = models[0]
        elif models and self.model not in models:
            raise LLMError(f"LLM endpoint {self.settings.endpoint} does not serve model {self.model!r} "
                           f"(it lists {', '.join(models[:5])})")
        return self.model

    # ------------------------------------------------------------------ the structured call

    def complete_json(self, stage: str, messages: Sequence[Message], schema: Mapping, *,
                      check: Check | None = None, salt: str = "") -> StageCall:
        """Ask for JSON matching `schema`; retry with the error; cache successes; record failures."""
        counters = self.usage.setdefault(stage, {"calls": 0, "attempts": 0, "cache_hits": 0, "failures": 0,
                                                 "prompt_tokens": 0, "completion_tokens": 0})
        counters["calls"] += 1
        key = self._cache_key(stage, messages, schema, salt)
        cache_path = self.cache_dir / stage / f"{key}.json"
        if cache_path.exists():
            try:
                value = json.loads(cache_path.read_text())["value"]
                counters["cache_hits"] += 1
                return StageCall(stage, value, None, 0, True)
            except (ValueError, KeyError):
                pass  # a damaged cache entry is recomputed
        conversation = [dict(m) for m in messages]
        conversation[-1]["content"] += ("\n\nReply with only a JSON value that matches this JSON schema:\n"
                                        + json.dumps(schema))
        error, reply, last_value = "no attempt made", "", None
        for attempt in range(1, self.settings.max_attempts + 1):
            counters["attempts"] += 1
            reply, value, error = self._attempt(stage, conversation, schema, counters)
            last_value = value if value is not None else last_value
            if error is None:
                error = _run_check(check, value)
                if error is None:
                    write_json_atomic(cache_path, {"stage": stage, "value": value, "attempts": attempt})
                    return StageCall(stage, value, None, attempt, False)
            conversation += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": f"That reply was invalid: {error}\n"
                                                         "Reply again with only the corrected JSON."}]
        counters["failures"] += 1
        self.failures.append({"stage": stage, "error": error, "attempts": self.settings.max_attempts,
                              "reply_excerpt": reply[:200]})
        return StageCall(stage, None, error, self.settings.max_attempts, False, last_value)

    def _attempt(self, stage: str, conversation: list[dict], schema: Mapping, counters: dict) -> tuple[str, Any, str | None]:
        """One HTTP round trip: (reply text, parsed JSON or None, error or None). Transport failures raise LLMError."""
        body: dict[str, Any] = {"model": self.model, "messages": conversation, "temperature": self.settings.temperature,
                                "max_tokens": self.settings.max_tokens}
        if self._structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": stage, "schema": dict(schema), "strict": False}}
        try:
            response = self._http.post("chat/completions", json=body)
            if response.status_code in (400, 422) and self._structured:
                self._structured = False  # the endpoint rejects response_format: fall back to the prompt alone
                body.pop("response_format")
                response = self._http.post("chat/completions", json=body)
        except httpx.HTTPError as e:
            raise LLMError(f"LLM endpoint {self.settings.endpoint} failed during stage {stage}: "
                           f"{type(e).__name__}: {e}") from None
        if response.status_code != 200:
            time.sleep(min(2.0, 0.1 * counters["attempts"]))
            return "", None, f"HTTP {response.status_code} from the endpoint"
        try:
            payload = response.json()
            reply = payload["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return "", None, "the endpoint's reply is not an OpenAI chat completion"
        usage = payload.get("usage") or {}
        counters["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        counters["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        try:
            value = extract_json(reply)
        except ValueError as e:
            return reply, None, str(e)
        return reply, value, schema_error(value, schema)

    def _cache_key(self, stage: str, messages: Sequence[Message], schema: Mapping, salt: str) -> str:
        s = self.settings
        material = {"stage": stage, "model": self.model, "endpoint": s.endpoint, "messages": list(messages),
                    "schema": schema, "temperature": s.temperature, "max_tokens": s.max_tokens, "salt": salt}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]

    def report(self) -> dict[str, Any]:
        """Teacher-model usage: totals, per stage, cost from the configured prices, and recorded failures."""
        total = {k: sum(c[k] for c in self.usage.values()) for k in
                 ("calls", "attempts", "cache_hits", "failures", "prompt_tokens", "completion_tokens")}
        cost = (total["prompt_tokens"] * self.settings.price_in_per_mtok
                + total["completion_tokens"] * self.settings.price_out_per_mtok) / 1e6
        return {"model": self.model, "endpoint": self.settings.endpoint, "total": total, "cost_usd": round(cost, 6),
                "per_stage": self.usage, "failures": self.failures}
