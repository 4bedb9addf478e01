import asyncio
import random

import pytest

from orchestra_jax.env.catalog import (
    Tool,
    ToolCatalog,
    ToolContext,
    ToolResult,
    resolve_alias,
)
from orchestra_jax.env.prices import Usage

ALIASES = ("echo-1", "echo-2")


async def _echo(arguments, context):
    backend = resolve_alias(arguments["model"], context, ALIASES)
    times = arguments.get("times", 1)
    return ToolResult(
        observation=f"{backend}:{arguments['text'] * times}", usage=(Usage(backend, 3, 4),), backend=backend
    )


async def _boom(arguments, context):
    raise RuntimeError("disk\non fire")


async def _slow(arguments, context):
    await asyncio.sleep(5)
    return ToolResult(observation="late")


ECHO = Tool(
    name="echo",
    description="repeat text",
    parameters={
        "type": "object",
        "properties": {"model": {"type": "string"}, "text": {"type": "string"}, "times": {"type": "integer"}},
        "required": ["model", "text"],
    },
    execute=_echo,
)


def _catalog():
    return ToolCatalog(
        tools=(
            ECHO,
            Tool("boom", "raises", {"type": "object", "properties": {}}, _boom),
            Tool("slow", "sleeps", {"type": "object", "properties": {}}, _slow, timeout_s=0.05),
        ),
        alias_map={"echo-1": "backend-a", "echo-2": "backend-b"},
    )


def run(coro):
    return asyncio.run(coro)


def test_schemas_are_openai_function_format():
    schemas = _catalog().schemas()
    assert [s["function"]["name"] for s in schemas] == ["echo", "boom", "slow"]
    assert schemas[0]["type"] == "function" and schemas[0]["function"]["parameters"]["required"] == [
        "model",
        "text",
    ]


def test_good_call_resolves_alias_and_measures_latency():
    text = "".join(random.choices("abcxyz", k=6))
    result = run(_catalog().execute("echo", {"model": "echo-2", "text": text, "times": 2}))
    assert result.error is None
    assert result.observation == f"backend-b:{text * 2}"
    assert result.backend == "backend-b" and result.usage == (Usage("backend-b", 3, 4),)
    assert result.latency_s is not None and result.latency_s >= 0


def test_per_task_alias_map_overrides_catalog_map():
    catalog = _catalog()
    result = run(
        catalog.execute("echo", {"model": "echo-1", "text": "x"}, ToolContext(alias_map={"echo-1": "z"}))
    )
    assert result.observation == "z:x"
    swapped = catalog.with_aliases({"echo-1": "backend-b", "echo-2": "backend-a"})
    assert run(swapped.execute("echo", {"model": "echo-1", "text": "x"})).observation == "backend-b:x"
    assert catalog.alias_map["echo-1"] == "backend-a"


@pytest.mark.parametrize(
    "name, arguments, fragment",
    [
        ("nope", {}, "unknown tool 'nope'"),
        (None, {}, "unknown tool None"),
        ("echo", "not a dict", "must be a JSON object"),
        ("echo", {"text": "x"}, "missing required argument 'model'"),
        ("echo", {"model": "echo-9", "text": "x"}, "unknown model 'echo-9'"),
        ("echo", {"model": 3, "text": "x"}, "'model' must be string"),
        ("echo", {"model": "echo-1", "text": "x", "times": "2"}, "'times' must be integer"),
        ("echo", {"model": "echo-1", "text": "x", "times": True}, "'times' must be integer"),
        ("boom", {}, "boom failed: RuntimeError: disk on fire"),
        ("slow", {}, "slow: timed out after 0.05s"),
    ],
)
def test_bad_calls_become_error_observations(name, arguments, fragment):
    result = run(_catalog().execute(name, arguments))
    assert result.error is not None and fragment in result.error
    assert "\n" not in result.error
    assert result.observation.startswith("Error: ")
    assert result.answer is None and result.latency_s is not None


def test_alias_missing_from_task_map():
    result = run(
        _catalog().execute("echo", {"model": "echo-1", "text": "x"}, ToolContext(alias_map={"echo-2": "q"}))
    )
    assert "no backend" in result.error


def test_duplicate_names_rejected_and_without():
    with pytest.raises(ValueError, match="duplicate tool name 'echo'"):
        ToolCatalog(tools=(ECHO, ECHO))
    assert _catalog().without("boom", "slow").names == ("echo",)
