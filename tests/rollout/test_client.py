"""SGLangEngine against `orchestra-jax serve` over loopback HTTP: balancing, failover, errors."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from rollout_helpers import run, start_server

from orchestra_jax import models
from orchestra_jax.rollout.engine import GenerateRequest, RequestError, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.rollout.sglang_client import EngineUnavailable, SGLangEngine, read_endpoints


def _requests(rng, n, max_new_tokens, vocab=300):
    return [
        GenerateRequest(
            tuple(int(t) for t in rng.integers(0, vocab, size=int(rng.integers(3, 12)))),
            SamplingParams(
                max_new_tokens=max_new_tokens, seed=int(rng.integers(2**40)), ignore_eos=True, top_k=20
            ),
            f"req-{i}",
        )
        for i in range(n)
    ]


async def _direct(config, params, requests):
    return await EmbeddedEngine(config, params, max_slots=4, max_context=128).generate(requests)


def _served_tokens(url):
    return httpx.get(url + "/get_server_info").json()["internal_states"][0]["stats"]["generated_tokens"]


def test_client_balances_over_servers_and_matches_direct_engine(tiny_model, small_tokenizer):
    config, params = tiny_model
    servers = [start_server(config, params, small_tokenizer) for _ in range(2)]
    try:
        requests = _requests(np.random.default_rng(), 8, 6)

        async def go():
            engine = SGLangEngine([s.url for s in servers])
            try:
                assert await engine.health()
                return await engine.generate(requests)
            finally:
                await engine.close()

        remote, direct = run(go()), run(_direct(config, params, requests))
        for request, r, d in zip(requests, remote, direct):
            assert r.rid == request.rid and r.weight_version == "v0"
            assert r.output_ids == d.output_ids
            np.testing.assert_allclose(r.logprobs, d.logprobs, atol=1e-5)
        assert all(_served_tokens(s.url) > 0 for s in servers)
    finally:
        for s in servers:
            s.stop()


def test_client_errors(tiny_model, small_tokenizer):
    config, params = tiny_model
    server = start_server(config, params, small_tokenizer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket closes
    try:

        async def go():
            engine = SGLangEngine([server.url])
            bad = GenerateRequest((1, 10**6), SamplingParams(max_new_tokens=2), "bad")
            with pytest.raises(RequestError, match="rejected"):
                await engine.generate([bad])
            await engine.close()
            nobody = SGLangEngine([dead_url], max_attempts=3, backoff_s=0.01)
            with pytest.raises(EngineUnavailable, match="3 attempts"):
                await nobody.generate([GenerateRequest((1, 2), SamplingParams(max_new_tokens=2), "lost")])
            assert not await nobody.health()
            await nobody.close()

        run(go())
    finally:
        server.stop()


def test_server_killed_mid_request_requests_complete_elsewhere(tiny_model, small_tokenizer, tmp_path):
    config, params = tiny_model
    model_dir = models.save_pretrained(config, params, tmp_path / "model", tokenizer=small_tokenizer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    doomed = subprocess.Popen(
        [sys.executable, "-m", "orchestra_jax", "serve", "--model-path", str(model_dir),
         "--port", str(port), "--context-length", "128", "--max-running-requests", "4"],
        env=dict(os.environ, XLA_FLAGS=""), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    doomed_url = f"http://127.0.0.1:{port}"
    survivor = start_server(config, params, small_tokenizer)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(doomed_url + "/health_generate", timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and doomed.poll() is None, "serve subprocess did not come up"
            time.sleep(0.2)
        requests = _requests(np.random.default_rng(), 12, 48)

        async def go():
            engine = SGLangEngine([doomed_url, survivor.url], backoff_s=0.05)
            task = asyncio.ensure_future(engine.generate(requests))
            while _running(doomed_url) == 0:
                await asyncio.sleep(0.02)
            doomed.send_signal(signal.SIGKILL)
            try:
                return await task, engine.retries
            finally:
                await engine.close()

        remote, retries = run(go())
        assert retries >= 1  # at least one request was cut off by the kill and sent to the survivor
        direct = run(_direct(config, params, requests))
        assert [c.rid for c in remote] == [r.rid for r in requests]
        for r, d in zip(remote, direct):
            assert r.completion_tokens == 48 and r.finish_reason == "length"
            assert r.output_ids == d.output_ids
    finally:
        doomed.kill()
        doomed.wait()
        survivor.stop()


def _running(url):
    try:
        return httpx.get(url + "/get_server_info", timeout=5).json()["num_running_requests"]
    except httpx.HTTPError:
        return 0


def test_read_endpoints(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"endpoints": ["http://127.0.0.1:1", "http://127.0.0.1:2"]}))
    (tmp_path / "b.txt").write_text("# fleet\nhttp://127.0.0.1:3\n\n")
    (tmp_path / "c.json").write_text("{broken")
    assert read_endpoints(tmp_path / "a.json") == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert read_endpoints(tmp_path / "b.txt") == ["http://127.0.0.1:3"]
    with pytest.raises(ValueError, match="c.json:1"):
        read_endpoints(tmp_path / "c.json")
    with pytest.raises(ValueError, match="cannot read"):
        read_endpoints(tmp_path / "missing.json")
