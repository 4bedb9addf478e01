"""`orchestra-jax serve`'s HTTP API over real loopback connections."""

import json
import threading
import time

import httpx
import numpy as np
from rollout_helpers import post, start_server

from orchestra_jax.rollout.engine import Completion, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine


def _ids(rng, n=None):
    return [int(t) for t in rng.integers(0, 300, size=n or int(rng.integers(3, 12)))]


def test_generate_input_ids_returns_sglang_fields(server, small_tokenizer):
    rng = np.random.default_rng()
    prompt = _ids(rng)
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": 6, "temperature": 0.7, "ignore_eos": True, "sampling_seed": 3},
        "return_logprob": True,
        "rid": "abc",
    }
    response = post(server.url, "/generate", body)
    assert response.status_code == 200, response.text
    out = response.json()
    meta = out["meta_info"]
    assert meta["id"] == "abc" and meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == 6
    assert meta["finish_reason"]["type"] == "length" and meta["weight_version"] == "v0"
    assert [row[1] for row in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(row[0] <= 1e-6 for row in meta["output_token_logprobs"])
    assert out["text"] == small_tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    again = post(server.url, "/generate", dict(body, rid="abd")).json()
    assert again["output_ids"] == out["output_ids"]  # same seed, same tokens


def test_generate_text_batch(server, small_tokenizer):
    body = {
        "text": ["The orchestrator", "Python code"],
        "sampling_params": [
            {"max_new_tokens": 3, "ignore_eos": True},
            {"max_new_tokens": 5, "ignore_eos": True},
        ],
        "rid": ["a", "b"],
    }
    out = post(server.url, "/generate", body).json()
    assert [o["meta_info"]["id"] for o in out] == ["a", "b"]
    assert [len(o["output_ids"]) for o in out] == [3, 5]
    assert out[0]["meta_info"]["prompt_tokens"] == len(small_tokenizer.encode("The orchestrator"))


def test_bad_requests_get_400_and_server_keeps_serving(server):
    rng = np.random.default_rng()
    cases = [
        ({"input_ids": []}, "empty"),
        ({"input_ids": _ids(rng, 200)}, "context"),
        ({"input_ids": [1, 10**6]}, "token id"),
        ({"input_ids": [1, 2], "sampling_params": {"temprature": 0.5}}, "temprature"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": -1}}, "top_p"),
        ({"input_ids": [1, 2], "text": "x"}, "exactly one"),
        ({"input_ids": [1, 2], "stream": True}, "stream"),
        ({"input_ids": [1, 2], "bogus": 1}, "bogus"),
        ({"input_ids": "12"}, "input_ids"),
    ]
    for body, word in cases:
        response = post(server.url, "/generate", body)
        assert response.status_code == 400, (body, response.text)
        assert word in response.json()["error"]["message"], response.text
    response = httpx.post(server.url + "/generate", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    ok = post(server.url, "/generate", {"input_ids": _ids(rng), "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_info_health_and_control_endpoints(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=60).status_code == 200
    assert httpx.get(server.url + "/get_weight_version").json() == {"weight_version": "v0"}
    assert httpx.get(server.url + "/get_model_info").json()["is_generation"] is True
    info = httpx.get(server.url + "/get_server_info").json()
    assert info["context_length"] == 128 and info["max_running_requests"] == 4
    assert httpx.post(server.url + "/flush_cache").status_code == 200
    assert post(server.url, "/abort_request", {}).status_code == 400
    assert post(server.url, "/pause_generation", {"mode": "sideways"}).status_code == 400


def test_pause_in_place_holds_requests_until_continue(server):
    assert post(server.url, "/pause_generation", {"mode": "in_place"}).json()["success"]
    result = {}

    def send():
        body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
        result["response"] = post(server.url, "/generate", body)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)
    assert "response" not in result
    assert httpx.post(server.url + "/flush_cache").status_code == 400  # a request is waiting
    assert post(server.url, "/continue_generation").status_code == 200
    sender.join(timeout=60)
    assert result["response"].json()["meta_info"]["completion_tokens"] == 4


def test_abort_request_ends_a_running_generation(tiny_model, small_tokenizer):
    # One token per decode call and a long budget, so the request is still running when the abort lands.
    config, params = tiny_model
    engine = EmbeddedEngine(config, params, max_slots=2, max_context=512, decode_chunk=1,
                            detokenize=small_tokenizer.decode)
    server = start_server(config, params, small_tokenizer, engine=engine)
    result = {}

    def send():
        body = {
            "input_ids": [5, 6, 7],
            "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
            "rid": "x1",
        }
        result["response"] = post(server.url, "/generate", body)

    try:
        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/get_server_info").json()["num_running_requests"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Hold it in its slot, then abort it.
        assert post(server.url, "/pause_generation", {"mode": "in_place"}).status_code == 200
        assert post(server.url, "/abort_request", {"rid": "x1"}).json()["num_aborted"] == 1
        assert post(server.url, "/continue_generation").status_code == 200
        sender.join(timeout=60)
        meta = result["response"].json()["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 500
    finally:
        server.stop()


def test_openai_completions(server, small_tokenizer):
    body = {"model": "tiny", "prompt": "The orchestrator", "max_tokens": 4, "temperature": 0.0, "seed": 1}
    out = post(server.url, "/v1/completions", body).json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] <= 4
    assert out["usage"]["prompt_tokens"] == len(small_tokenizer.encode("The orchestrator"))
    assert post(server.url, "/v1/completions", dict(body, n=3)).status_code == 400
    assert post(server.url, "/v1/completions", dict(body, prompt="")).status_code == 400


class ScriptedEngine(EmbeddedEngine):
    """Answers every request with fixed tokens: lets the chat endpoint's tool-call parsing be checked."""

    script: list[int] = []

    async def generate(self, requests):
        return [
            Completion(r.rid, tuple(self.script), (-0.5,) * len(self.script), "stop", len(r.prompt_ids),
                       len(self.script), self.weight_version, 0.01)
            for r in requests
        ]  # fmt: skip


def test_openai_chat_completions_parses_tool_calls(tiny_model, small_tokenizer):
    config, params = tiny_model
    engine = ScriptedEngine(config, params, max_slots=1, max_context=512)
    call = '<tool_call>\n{"name": "search", "arguments": {"query": "capital of France"}}\n</tool_call>'
    engine.script = small_tokenizer.encode("Let me look.\n" + call + "<|im_end|>")
    thread = start_server(config, params, small_tokenizer, engine=engine)
    try:
        tools = [{"type": "function", "function": {"name": "search", "description": "web search",
                  "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]  # fmt: skip
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Capital of France?"}],
            "tools": tools,
        }
        out = post(thread.url, "/v1/chat/completions", body).json()
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [tool_call] = choice["message"]["tool_calls"]
        assert tool_call["function"]["name"] == "search"
        assert json.loads(tool_call["function"]["arguments"]) == {"query": "capital of France"}
        assert "Let me look." in choice["message"]["content"]
        assert out["usage"]["completion_tokens"] == len(engine.script)
        bad = post(thread.url, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
        assert bad.status_code == 400
    finally:
        thread.stop()


def test_sampling_params_roundtrip_through_server_names():
    params = SamplingParams(
        max_new_tokens=9, temperature=0.3, top_p=0.8, top_k=4, min_p=0.1, stop=("x",), seed=7
    )
    assert SamplingParams.from_sglang(params.to_sglang()) == params
