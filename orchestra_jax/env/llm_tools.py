"""Expert and generalist LLMs as tools: any OpenAI-compatible chat endpoint through the `openai` client.

An endpoints file names each backend once: where it is served, which model id to send, which environment
variable holds its key (the key itself never appears in files, logs or errors), its context cap, and its retry
budget. The backend `name` is what alias maps and the price table use. A call never raises: an unreachable
endpoint is retried by the client library, then reported as `ChatReply.error`; usage feeds the ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import openai

from orchestra_jax.env.catalog import Tool, ToolContext, ToolResult, error_result, resolve_alias
from orchestra_jax.env.prices import Usage


class EndpointError(ValueError):
    """A malformed endpoints file or a missing key variable, phrased as one line."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    name: str
    """Backend name: the alias maps' target and the price table's key."""
    base_url: str
    model: str
    """Model id sent to the server."""
    api_key_env: str | None = None
    """Environment variable holding the key; None for local servers that take any key."""
    context_tokens: int = 32768
    """Prompt + completion cap; longer prompts are cut (oldest text first) to fit."""
    max_output_tokens: int = 1024
    temperature: float | None = None
    timeout_s: float = 120.0
    max_retries: int = 2


_ENDPOINT_FIELDS = {f.name for f in dataclasses.fields(Endpoint)}


def endpoints_from_json(data: Any, source: str = "<json>") -> dict[str, Endpoint]:
    """`{"endpoints": [{name, base_url, model, ...}, ...]}` (or the bare list) -> name -> Endpoint."""
    items = data.get("endpoints") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise EndpointError(f"{source}: expected a list of endpoints or {{'endpoints': [...]}}")
    out: dict[str, Endpoint] = {}
    for i, item in enumerate(items):
        where = f"{source}: endpoints[{i}]"
        if not isinstance(item, dict):
            raise EndpointError(f"{where}: expected an object, got {type(item).__name__}")
        unknown = set(item) - _ENDPOINT_FIELDS
        missing = {"name", "base_url", "model"} - set(item)
        if unknown or missing:
            raise EndpointError(
                f"{where}: {'unknown' if unknown else 'missing'} field {sorted(unknown or missing)[0]!r}"
            )
        try:
            endpoint = Endpoint(**item)
        except TypeError as e:
            raise EndpointError(f"{where}: {e}") from None
        if (
            not isinstance(endpoint.context_tokens, int)
            or endpoint.context_tokens <= endpoint.max_output_tokens
        ):
            raise EndpointError(f"{where}: context_tokens must exceed max_output_tokens")
        if endpoint.name in out:
            raise EndpointError(f"{where}: duplicate endpoint name {endpoint.name!r}")
        out[endpoint.name] = endpoint
    return out


def load_endpoints(path: str | Path) -> dict[str, Endpoint]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise EndpointError(f"cannot read endpoints file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise EndpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    return endpoints_from_json(data, str(path))


@dataclasses.dataclass(frozen=True)
class ChatReply:
    text: str
    usage: Usage
    latency_s: float
    error: str | None = None
    truncated_prompt: bool = False


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters a token) for caps and for servers that omit usage."""
    return (len(text) + 3) // 4


def fit_messages(
    messages: Sequence[Mapping[str, str]], budget_tokens: int, count: Callable[[str], int] = approx_tokens
) -> tuple[list[dict[str, str]], bool]:
    """Cut the longest message's oldest text until the prompt fits `budget_tokens` (ToolOrchestra keeps the tail)."""
    out = [dict(m) for m in messages]
    cut = False
    while sum(count(m.get("content") or "") for m in out) > budget_tokens:
        longest = max(out, key=lambda m: len(m.get("content") or ""))
        text = longest.get("content") or ""
        excess = sum(count(m.get("content") or "") for m in out) - budget_tokens
        if not text:
            break
        keep = max(0, len(text) - max(1, excess * 4) - 16)
        longest["content"] = text[len(text) - keep :] if keep else ""
        cut = True
    return out, cut


class ChatClient:
    """One `openai.AsyncOpenAI` per endpoint; `chat` returns a ChatReply and never raises."""

    def __init__(self, endpoints: Mapping[str, Endpoint], *, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.endpoints = dict(endpoints)
        self._keys: dict[str, str] = {}
        for name, ep in self.endpoints.items():
            if ep.api_key_env is not None and not environ.get(ep.api_key_env):
                raise EndpointError(f"endpoint {name!r}: environment variable {ep.api_key_env} is not set")
            self._keys[name] = environ[ep.api_key_env] if ep.api_key_env else "EMPTY"
        # An AsyncOpenAI's connection pool belongs to one event loop; keep one client set per loop.
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _client(self, name: str) -> openai.AsyncOpenAI:
        per_loop = self._clients.setdefault(asyncio.get_running_loop(), {})
        if name not in per_loop:
            ep = self.endpoints[name]
            per_loop[name] = openai.AsyncOpenAI(
                base_url=ep.base_url,
                api_key=self._keys[name],
                max_retries=ep.max_retries,
                timeout=ep.timeout_s,
            )
        return per_loop[name]

    async def chat(
        self,
        backend: str,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
    ) -> ChatReply:
        start = time.perf_counter()
        ep = self.endpoints.get(backend)
        if ep is None:
            return ChatReply("", Usage(backend, 0, 0), 0.0, f"no endpoint named {backend!r}")
        max_tokens = min(max_tokens or ep.max_output_tokens, ep.max_output_tokens)
        fitted, cut = fit_messages(messages, ep.context_tokens - max_tokens)
        kwargs: dict[str, Any] = {"model": ep.model, "messages": fitted, "max_tokens": max_tokens}
        temperature = ep.temperature if temperature is None else temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        if stop:
            kwargs["stop"] = list(stop)
        try:
            response = await self._client(backend).chat.completions.create(**kwargs)
        except openai.APIStatusError as e:
            return ChatReply(
                "",
                Usage(backend, 0, 0),
                time.perf_counter() - start,
                f"endpoint {backend!r} answered HTTP {e.status_code}",
                cut,
            )
        except (TimeoutError, openai.APIError) as e:
            tries = ep.max_retries + 1
            return ChatReply(
                "",
                Usage(backend, 0, 0),
                time.perf_counter() - start,
                f"endpoint {backend!r} unreachable after {tries} tries: {type(e).__name__}",
                cut,
            )
        latency = time.perf_counter() - start
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content or "") if choice is not None else ""
        if response.usage is not None:
            usage = Usage(backend, response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0)
        else:
            usage = Usage(
                backend, sum(approx_tokens(m.get("content") or "") for m in fitted), approx_tokens(text)
            )
        return ChatReply(text, usage, latency, None if choice is not None else "empty reply", cut)

    async def close(self) -> None:
        """Close this event loop's connections."""
        for client in self._clients.pop(asyncio.get_running_loop(), {}).values():
            await client.close()


def make_expert_tool(
    client: ChatClient,
    *,
    name: str = "call_expert",
    aliases: Sequence[str] = ("expert-1", "expert-2", "expert-3"),
    description: str = "Ask an expert model a question and get its reply.",
    system_prompt: str | None = None,
) -> Tool:
    """A tool `name(model=<alias>, question=<text>)` whose reply is the expert's answer text (tau2's call_expert)."""

    async def execute(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        backend = resolve_alias(arguments["model"], context, aliases)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": arguments["question"]}
        ]
        reply = await client.chat(backend, messages)
        cost = context.prices.call_cost(reply.usage)
        if reply.error:
            failed = error_result(f"{name}: {reply.error}", latency_s=reply.latency_s)
            return dataclasses.replace(failed, cost_usd=cost, usage=(reply.usage,), backend=backend)
        return ToolResult(
            observation=reply.text,
            cost_usd=cost,
            latency_s=reply.latency_s,
            usage=(reply.usage,),
            backend=backend,
        )

    parameters = {
        "type": "object",
        "properties": {
            "model": {"type": "string", "description": f"The expert to ask. Choices: {list(aliases)}."},
            "question": {"type": "string", "description": "The question, with the context the expert needs."},
        },
        "required": ["model", "question"],
    }
    return Tool(name=name, description=description, parameters=parameters, execute=execute)
