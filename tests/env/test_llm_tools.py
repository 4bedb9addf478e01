import asyncio
import json
import random
import secrets
import socket

import pytest
from openai_stub import stub_app

from orchestra_jax.env.catalog import ToolCatalog, ToolContext
from orchestra_jax.env.llm_tools import (
    ChatClient,
    Endpoint,
    EndpointError,
    approx_tokens,
    fit_messages,
    load_endpoints,
    make_expert_tool,
)
from orchestra_jax.env.prices import ModelPrice, Usage, default_price_table
from orchestra_jax.env.search import BackgroundServer


def reverse_words(messages):
    return " ".join(reversed(messages[-1]["content"].split()))


def _endpoint(url, **kw):
    return Endpoint(name=kw.pop("name", "stub"), base_url=url + "/v1", model="stub-model", **kw)


def test_chat_usage_and_key_from_environment():
    key = secrets.token_hex(12)
    app = stub_app(reverse_words, api_key=key)
    words = [secrets.token_hex(2) for _ in range(random.randint(3, 9))]
    with BackgroundServer(app) as server:
        client = ChatClient(
            {"stub": _endpoint(server.url, api_key_env="STUB_KEY")}, environ={"STUB_KEY": key}
        )
        reply = asyncio.run(
            client.chat("stub", [{"role": "user", "content": " ".join(words)}], max_tokens=64)
        )
    assert reply.error is None and reply.text == " ".join(reversed(words))
    assert reply.usage == Usage("stub", len(words), len(words))
    assert app.state.requests[0]["model"] == "stub-model" and app.state.requests[0]["max_tokens"] == 64
    assert key not in repr(client.endpoints)


def test_wrong_key_is_reported_without_the_key():
    key = secrets.token_hex(12)
    with BackgroundServer(stub_app(reverse_words, api_key="right")) as server:
        client = ChatClient({"stub": _endpoint(server.url, api_key_env="K")}, environ={"K": key})
        reply = asyncio.run(client.chat("stub", [{"role": "user", "content": "hi"}]))
    assert reply.error == "endpoint 'stub' answered HTTP 401" and key not in reply.error


def test_missing_key_variable_fails_at_setup():
    with pytest.raises(EndpointError, match="NOT_SET_ANYWHERE is not set"):
        ChatClient(
            {"x": Endpoint("x", "http://127.0.0.1:1/v1", "m", api_key_env="NOT_SET_ANYWHERE")}, environ={}
        )


def test_retries_then_success():
    app = stub_app(lambda m: "ok", fail_first=1)
    with BackgroundServer(app) as server:
        client = ChatClient({"stub": _endpoint(server.url, max_retries=2)})
        reply = asyncio.run(client.chat("stub", [{"role": "user", "content": "hi"}]))
    assert reply.error is None and reply.text == "ok" and len(app.state.requests) == 2


def test_unreachable_endpoint_is_an_error_not_an_exception():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(
        {"gone": Endpoint("gone", f"http://127.0.0.1:{port}/v1", "m", max_retries=1, timeout_s=5)}
    )
    reply = asyncio.run(client.chat("gone", [{"role": "user", "content": "hi"}]))
    assert reply.error == "endpoint 'gone' unreachable after 2 tries: APIConnectionError"
    assert reply.text == "" and reply.usage == Usage("gone", 0, 0)
    assert asyncio.run(client.chat("nope", [])).error == "no endpoint named 'nope'"


def test_context_cap_keeps_the_tail():
    app = stub_app(lambda m: "fine", usage=False)
    tail = secrets.token_hex(8)
    long_text = "filler " * 2000 + tail
    with BackgroundServer(app) as server:
        client = ChatClient({"stub": _endpoint(server.url, context_tokens=300, max_output_tokens=100)})
        reply = asyncio.run(
            client.chat(
                "stub",
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": long_text}],
                max_tokens=500,
            )
        )
    sent = app.state.requests[0]
    assert reply.truncated_prompt and sent["max_tokens"] == 100
    assert sent["messages"][0]["content"] == "be brief" and sent["messages"][1]["content"].endswith(tail)
    assert sum(approx_tokens(m["content"]) for m in sent["messages"]) <= 200
    # without usage from the server the client estimates it
    assert reply.usage.prompt_tokens == sum(approx_tokens(m["content"]) for m in sent["messages"])


def test_fit_messages_leaves_short_prompts_alone():
    messages = [{"role": "user", "content": "short"}]
    assert fit_messages(messages, 100) == (messages, False)


def test_expert_tool_prices_usage():
    with BackgroundServer(stub_app(reverse_words)) as server:
        client = ChatClient({"local/expert": _endpoint(server.url, name="local/expert")})
        catalog = ToolCatalog((make_expert_tool(client),), alias_map={"expert-1": "local/expert"})
        prices = default_price_table().with_models({"local/expert": ModelPrice(2.0, 4.0)})
        context = ToolContext(prices=prices)
        result = asyncio.run(
            catalog.execute("call_expert", {"model": "expert-1", "question": "a b c"}, context)
        )
        bad_alias = asyncio.run(
            catalog.execute("call_expert", {"model": "expert-7", "question": "x"}, context)
        )
    assert result.error is None and result.observation == "c b a"
    assert result.usage == (Usage("local/expert", 3, 3),)
    assert result.cost_usd == pytest.approx((2.0 * 3 + 4.0 * 3) / 1e6)
    assert "unknown model 'expert-7'" in bad_alias.error


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"endpoints": [{"name": "a", "base_url": "u"}]}', "missing field 'model'"),
        ('[{"name": "a", "base_url": "u", "model": "m", "colour": 1}]', "unknown field 'colour'"),
        (
            '[{"name": "a", "base_url": "u", "model": "m"}, {"name": "a", "base_url": "v", "model": "n"}]',
            "duplicate",
        ),
        (
            '[{"name": "a", "base_url": "u", "model": "m", "context_tokens": 10}]',
            "context_tokens must exceed",
        ),
        ("{oops", "invalid JSON"),
    ],
)
def test_bad_endpoint_files(tmp_path, content, message):
    path = tmp_path / "endpoints.json"
    path.write_text(content)
    with pytest.raises(EndpointError, match=message):
        load_endpoints(path)


def test_good_endpoint_file(tmp_path):
    path = tmp_path / "endpoints.json"
    path.write_text(
        json.dumps(
            {
                "endpoints": [
                    {
                        "name": "gpt-5",
                        "base_url": "https://example.invalid/v1",
                        "model": "gpt-5",
                        "api_key_env": "OPENAI_API_KEY",
                    }
                ]
            }
        )
    )
    assert load_endpoints(path)["gpt-5"].api_key_env == "OPENAI_API_KEY"


@pytest.mark.slow  # compiles the tiny model's prefill/decode: ~30 s on 2 shared cores
def test_against_orchestra_jax_serve():
    """The real `orchestra-jax serve` app (embedded sampler, tiny random model) as an expert endpoint."""
    import dataclasses

    import jax
    import numpy as np

    from orchestra_jax.models import transformer
    from orchestra_jax.models.tokenizer import train_small_tokenizer
    from orchestra_jax.models.transformer_config import get_preset
    from orchestra_jax.rollout.sampler import EmbeddedEngine
    from orchestra_jax.rollout.server import ServedModel, create_app

    tokenizer = train_small_tokenizer(
        ["The expert answers questions about numbers 0 1 2 3 4 5 6 7 8 9."] * 20, vocab_size=320
    )
    config = dataclasses.replace(
        get_preset("qwen3-tiny", tokenizer.vocab_size), eos_token_ids=tokenizer.eos_token_ids
    )
    params = transformer.init_params(config, jax.random.key(np.random.randint(2**31)))
    engine = EmbeddedEngine(config, params, max_slots=2, max_context=128, detokenize=tokenizer.decode)
    app = create_app(ServedModel(engine, tokenizer, "tiny", "tiny-expert"))
    with BackgroundServer(app) as server:
        client = ChatClient(
            {
                "local/tiny": Endpoint(
                    "local/tiny", server.url + "/v1", "tiny-expert", max_output_tokens=6, temperature=0.0
                )
            }
        )
        catalog = ToolCatalog((make_expert_tool(client),), alias_map={"expert-1": "local/tiny"})
        prices = default_price_table().with_models({"local/tiny": ModelPrice(0.1, 0.2)})
        result = asyncio.run(
            catalog.execute(
                "call_expert", {"model": "expert-1", "question": "What is 2 + 3?"}, ToolContext(prices=prices)
            )
        )
    assert result.error is None and isinstance(result.observation, str)
    (usage,) = result.usage
    assert usage.model == "local/tiny" and usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 6
    assert result.cost_usd == pytest.approx((0.1 * usage.prompt_tokens + 0.2 * usage.completion_tokens) / 1e6)
