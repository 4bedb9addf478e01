import asyncio
import json
import random

import pytest
from openai_stub import stub_app

from orchestra_jax.env.catalog import ToolContext
from orchestra_jax.env.ledger import Ledger
from orchestra_jax.env.llm_tools import ChatClient, ChatReply, Endpoint
from orchestra_jax.env.prices import ModelPrice, Usage, default_price_table
from orchestra_jax.env.sandbox import SandboxLimits
from orchestra_jax.env.search import BackgroundServer, BM25Index, LocalRetriever, Passage
from orchestra_jax.env.toolorchestra_tools import (
    ALIASES,
    PASSTHROUGH,
    TOOLORCHESTRA_ALIAS_MAP,
    ToolOrchestraConfig,
    random_alias_map,
    toolorchestra_catalog,
)


def test_default_catalog_reproduces_tools_json(shared_data):
    reference = json.loads((shared_data / "toolorchestra" / "evaluation" / "tools.json").read_text())
    fixed = json.loads(json.dumps(reference).replace("$$0.2", "$0.2"))  # the released file's one typo
    assert toolorchestra_catalog(None, None).schemas() == fixed


def test_random_alias_map_is_seeded_and_describes_the_swap():
    seed = random.randint(0, 10**6)
    a, b = random_alias_map(seed), random_alias_map(seed)
    assert a == b and set(a) == set(TOOLORCHESTRA_ALIAS_MAP)
    for aliases in ALIASES.values():
        pool = {TOOLORCHESTRA_ALIAS_MAP[x] for x in aliases}
        assert sorted(a[x] for x in aliases) == sorted(pool)  # a permutation of the tool's own backends
    assert len({tuple(sorted(random_alias_map(s).items())) for s in range(20)}) > 1
    swapped = {**TOOLORCHESTRA_ALIAS_MAP, "search-1": "Qwen/Qwen3-32B", "search-3": "gpt-5"}
    description = (
        toolorchestra_catalog(None, None, alias_map=swapped)
        .get("search")
        .parameters["properties"]["model"]["description"]
    )
    assert "search-1 | $0.8 | $0.8 | 8s" in description and "search-3 | $1.25 | $10 | 22s" in description
    assert description.index("search-1 can also write queries") < description.index(
        "search-3 usually identifies"
    )
    with pytest.raises(ValueError, match="no backend for 'reasoner-1'"):
        toolorchestra_catalog(None, None, alias_map={"search-1": "x"})


PASSAGES = [
    Passage("p0", "Zorblat", "Zorblat is a town founded in 1712 by Mira Quell."),
    Passage("p1", "Mira Quell", "Mira Quell was a cartographer born in Vessan."),
    Passage("p2", "Vessan", "Vessan is a river port."),
]


def _reply(messages):
    text = messages[-1]["content"]
    if "<query>" in text:
        return "Thinking.\n<query>Zorblat founded</query>"
    if "python code" in text:
        return "Here:\n```python\nprint(1712 + 300)\n```"
    if messages[0]["content"].startswith("Please reason step by step"):
        return "The town was founded in 1712, so \\boxed{2012}"
    return "<think>easy</think>\n<answer>Mira Quell</answer>"


@pytest.fixture()
def stack():
    app = stub_app(_reply)
    prices = default_price_table().with_models(
        {"stub-big": ModelPrice(2.0, 8.0), "stub-math": ModelPrice(0.5, 0.5)}
    )
    with BackgroundServer(app) as server:
        client = ChatClient(
            {name: Endpoint(name, server.url + "/v1", name) for name in ("stub-big", "stub-math")}
        )
        alias_map = {a: "stub-big" for aliases in ALIASES.values() for a in aliases} | {
            "answer-math-1": "stub-math",
            "search-3": PASSTHROUGH,
        }
        config = ToolOrchestraConfig(
            sandbox_timeout_s=20,
            sandbox_limits=SandboxLimits(cpu_s=5, memory_bytes=512 << 20, max_processes=16),
        )
        catalog = toolorchestra_catalog(
            client,
            LocalRetriever(BM25Index.build(PASSAGES)),
            alias_map=alias_map,
            prices=prices,
            config=config,
        )
        yield catalog, prices, app


def _cost(prices, usage):
    return sum(prices.call_cost(u) for u in usage)


def test_episode_of_three_tools(stack):
    catalog, prices, app = stack
    context = ToolContext(question="Who founded Zorblat?", reference_answer="Mira Quell", prices=prices)
    ledger = Ledger()

    found = asyncio.run(catalog.execute("search", {"model": "search-1"}, context))
    assert found.error is None and found.documents[0].startswith("Zorblat\n")
    assert found.observation.startswith("Query: Zorblat founded\n\nDoc 1: Zorblat")
    assert found.cost_usd == pytest.approx(_cost(prices, found.usage))
    ledger = ledger.add_tool_result("search", found)

    context = ToolContext(
        question=context.question, reference_answer="Mira Quell", prices=prices, documents=found.documents
    )
    ran = asyncio.run(catalog.execute("enhance_reasoning", {"model": "reasoner-2"}, context))
    assert ran.error is None and "```output\n2012\n```" in ran.observation
    assert ran.code_runs == (("print(1712 + 300)", "2012"),)
    assert ran.sandbox_s > 0
    assert ran.cost_usd == pytest.approx(
        _cost(prices, ran.usage) + ran.sandbox_s * prices.sandbox_usd_per_second
    )
    writer_prompt = app.state.requests[-1]["messages"][0]["content"]
    assert writer_prompt.startswith("Documents:\nDoc 1: Zorblat\nZorblat is a town")
    ledger = ledger.add_tool_result("enhance_reasoning", ran)

    answered = asyncio.run(catalog.execute("answer", {"model": "answer-1"}, context))
    assert answered.answer == "Mira Quell" and answered.correct is True and answered.judge_cost_usd == 0
    ledger = ledger.add_tool_result("answer", answered)
    math = asyncio.run(catalog.execute("answer", {"model": "answer-math-1"}, context))
    assert math.answer == "2012" and math.correct is False and math.usage[0].model == "stub-math"

    assert ledger.tool_calls == {"search": 1, "enhance_reasoning": 1, "answer": 1}
    expected = _cost(prices, found.usage + ran.usage + answered.usage) + ran.sandbox_s * 0.0000083
    assert ledger.cost_usd == pytest.approx(expected)
    assert ledger.tool_latency_s == pytest.approx(found.latency_s + ran.latency_s + answered.latency_s)
    assert ledger.prompt_tokens["stub-big"] == sum(
        u.prompt_tokens for u in found.usage + ran.usage + answered.usage
    )


def test_passthrough_search_costs_nothing(stack):
    catalog, prices, app = stack
    before = len(app.state.requests)
    result = asyncio.run(
        catalog.execute(
            "search", {"model": "search-3"}, ToolContext(question="Vessan river port", prices=prices)
        )
    )
    assert len(app.state.requests) == before and result.cost_usd == 0 and result.usage == ()
    assert (
        result.observation.startswith("Query: Vessan river port")
        and "Vessan is a river port." in result.observation
    )


def test_failures_are_observations(stack):
    catalog, prices, _ = stack
    bad = asyncio.run(catalog.execute("answer", {"model": "answer-9"}, ToolContext(prices=prices)))
    assert "unknown model 'answer-9'" in bad.error
    no_model = asyncio.run(catalog.execute("search", {}, ToolContext(prices=prices)))
    assert "missing required argument 'model'" in no_model.error
    offline = toolorchestra_catalog(None, None)
    res = asyncio.run(offline.execute("enhance_reasoning", {"model": "reasoner-1"}, ToolContext()))
    assert res.error == "enhance_reasoning: no model endpoints are configured"
    assert (
        asyncio.run(offline.execute("search", {"model": "search-1"})).error
        == "search: no retriever is configured"
    )


class FixedWriter:
    """A code writer that always writes the same program (a ChatClient stand-in)."""

    def __init__(self, code):
        self.reply = f"```python\n{code}\n```"

    async def chat(self, backend, messages, **kwargs):
        return ChatReply(self.reply, Usage(backend, 10, 5), 0.01)


def test_hostile_generated_code_is_reported():
    prices = default_price_table().with_models({"writer": ModelPrice(1.0, 2.0)})
    code = "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)"
    config = ToolOrchestraConfig(
        sandbox_timeout_s=20, sandbox_limits=SandboxLimits(cpu_s=5, max_processes=16)
    )
    catalog = toolorchestra_catalog(
        FixedWriter(code),
        None,
        alias_map=dict.fromkeys(TOOLORCHESTRA_ALIAS_MAP, "writer"),
        prices=prices,
        config=config,
    )
    result = asyncio.run(
        catalog.execute("enhance_reasoning", {"model": "reasoner-1"}, ToolContext(prices=prices))
    )
    assert result.error is not None and "Error: " in result.observation
    assert result.cost_usd == pytest.approx(
        (10 * 1.0 + 5 * 2.0) / 1e6 + result.sandbox_s * prices.sandbox_usd_per_second
    )
