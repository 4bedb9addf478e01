"""The tools an orchestrator may call: name, JSON schema, priced description, and an async executor.

A policy's tool call is untrusted input. `ToolCatalog.execute` never raises for a bad call: an unknown tool,
arguments that are not an object or break the schema, an unknown model alias, an executor that raises or
overruns its time all come back as a `ToolResult` whose `error` is one line and whose observation says so.
Model aliases (search-1, reasoner-2, ...) name backends only through `alias_map`, which a task may replace
(`with_aliases`), so which real model hides behind an alias can be randomised per task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from orchestra_jax.env.prices import PriceTable, Usage, default_price_table


class ToolCallError(ValueError):
    """A tool call the policy got wrong (bad argument, unknown alias); becomes an error observation."""


@dataclasses.dataclass(frozen=True)
class ToolContext:
    """What a tool may read about the episode it serves; built by the episode loop for each call."""

    task_id: str = ""
    question: str = ""
    reference_answer: str | tuple[str, ...] | None = None
    """Gold answer (or its aliases), read only by the `answer` tool's judge."""
    documents: tuple[str, ...] = ()
    """Passages gathered so far (ToolOrchestra's context: search results)."""
    code_runs: tuple[tuple[str, str], ...] = ()
    """(code, output) pairs executed so far."""
    alias_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """alias -> backend name for this task; empty means the catalog's own map."""
    prices: PriceTable = dataclasses.field(default_factory=default_price_table)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    observation: str
    cost_usd: float = 0.0
    latency_s: float | None = None
    """Wall-clock seconds; None lets `ToolCatalog.execute` fill in what it measured."""
    usage: tuple[Usage, ...] = ()
    answer: str | None = None
    """Set by the `answer` tool: the final answer, which ends the episode."""
    error: str | None = None
    correct: bool | None = None
    """The judge's verdict on `answer` when the task had a reference answer."""
    judge_cost_usd: float = 0.0
    sandbox_s: float = 0.0
    search_queries: int = 0
    documents: tuple[str, ...] = ()
    """New passages this call found (search), for context-mode prompts."""
    code_runs: tuple[tuple[str, str], ...] = ()
    backend: str | None = None
    """The real model an alias resolved to, for logs."""


Executor = Callable[[dict[str, Any], ToolContext], Awaitable[ToolResult]]


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]
    """JSON schema of the arguments object (type, properties, required, enum are checked)."""
    execute: Executor
    timeout_s: float | None = None

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


def error_result(message: str, *, latency_s: float | None = None) -> ToolResult:
    return ToolResult(observation=f"Error: {message}", error=message, latency_s=latency_s)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


def _check_value(value: Any, schema: Mapping[str, Any], where: str) -> None:
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        ok = any(
            isinstance(value, _JSON_TYPES.get(t, object))
            and not (isinstance(value, bool) and t in ("integer", "number"))
            for t in names
        )
        if not ok:
            raise ToolCallError(
                f"argument {where} must be {'|'.join(names)}, got {type(value).__name__} {value!r:.60}"
            )
    if "enum" in schema and value not in schema["enum"]:
        raise ToolCallError(f"argument {where}={value!r:.60} is not one of {list(schema['enum'])}")
    if isinstance(value, (list, tuple)) and "items" in schema:
        for i, item in enumerate(value):
            _check_value(item, schema["items"], f"{where}[{i}]")


def validate_arguments(arguments: Any, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Check a call's arguments against the tool's JSON schema (the subset tool schemas use)."""
    if not isinstance(arguments, dict):
        raise ToolCallError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    properties = parameters.get("properties", {})
    for name in parameters.get("required", ()):
        if name not in arguments:
            raise ToolCallError(f"missing required argument {name!r}")
    for name, value in arguments.items():
        if name not in properties:
            if parameters.get("additionalProperties", True) is False:
                raise ToolCallError(f"unexpected argument {name!r}")
            continue
        _check_value(value, properties[name], repr(name))
    return arguments


def resolve_alias(alias: Any, context: ToolContext, allowed: Sequence[str]) -> str:
    """Map a model alias the policy chose to this task's backend, or raise a ToolCallError."""
    if not isinstance(alias, str) or alias not in allowed:
        raise ToolCallError(f"unknown model {alias!r:.60}; choices: {list(allowed)}")
    try:
        return context.alias_map[alias]
    except KeyError:
        raise ToolCallError(f"model {alias!r} has no backend in this task's alias map") from None


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class ToolCatalog:
    tools: tuple[Tool, ...]
    alias_map: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tool catalog: duplicate tool name {duplicates[0]!r}")
        object.__setattr__(self, "tools", tuple(self.tools))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def get(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools=` argument of the chat template, in OpenAI function format."""
        return [t.schema() for t in self.tools]

    def with_aliases(self, alias_map: Mapping[str, str]) -> ToolCatalog:
        return dataclasses.replace(self, alias_map=dict(alias_map))

    def without(self, *names: str) -> ToolCatalog:
        return dataclasses.replace(self, tools=tuple(t for t in self.tools if t.name not in names))

    async def execute(self, name: Any, arguments: Any, context: ToolContext | None = None) -> ToolResult:
        """Run one call; every failure becomes an error ToolResult, and latency_s is always set."""
        context = context if context is not None else ToolContext()
        if not context.alias_map and self.alias_map:
            context = dataclasses.replace(context, alias_map=self.alias_map)
        start = time.perf_counter()
        tool = self.get(name) if isinstance(name, str) else None
        if tool is None:
            return error_result(f"unknown tool {name!r:.60}; available: {list(self.names)}", latency_s=0.0)
        try:
            validate_arguments(arguments, tool.parameters)
            call = tool.execute(dict(arguments), context)
            result = await (asyncio.wait_for(call, tool.timeout_s) if tool.timeout_s else call)
        except ToolCallError as e:
            result = error_result(f"{tool.name}: {e}")
        except TimeoutError:
            result = error_result(f"{tool.name}: timed out after {tool.timeout_s:g}s")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a tool's bug must not fail the episode batch
            result = error_result(f"{tool.name} failed: {type(e).__name__}: {_one_line(e)}")
        if result.latency_s is None:
            result = dataclasses.replace(result, latency_s=time.perf_counter() - start)
        return result
