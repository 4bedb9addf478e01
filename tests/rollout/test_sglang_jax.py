"""Integration: SGLangEngine against real SGLang code (sglang-jax 0.1.0rc0 on CPU, its own Python 3.12 venv).

Set-up once (not part of the project's dependencies: sglang-jax pins other jax/flax versions):

    python3.12 -m venv /tmp/sgljax
    /tmp/sgljax/bin/pip install sglang-jax==0.1.0rc0 "jax[cpu]==0.10.2"

Run:  SGLANG_JAX_PYTHON=/tmp/sgljax/bin/python python -m pytest tests/rollout/test_sglang_jax.py -m integration

sglang-jax needs head_dim 128; with its overlap scheduler on, a decode batch that mixes requests with and
without log-probs crashes its scheduler, so the server runs with --disable-overlap-schedule. It has no
/update_weights_from_disk or /get_weight_version, so weight sync is tested against `orchestra-jax serve` only.
"""

import asyncio
import os
import pathlib
import socket
import subprocess
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestra_jax import models
from orchestra_jax.rollout.engine import GenerateRequest, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.rollout.sglang_client import SGLangEngine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sglang_jax(small_tokenizer, tmp_path_factory):
    python = os.environ.get("SGLANG_JAX_PYTHON")
    if not python or not pathlib.Path(python).exists():
        pytest.skip(
            "set SGLANG_JAX_PYTHON to the python of a venv with sglang-jax 0.1.0rc0 (see this file's docstring)"
        )
    config = models.TransformerConfig(
        family="qwen3", vocab_size=small_tokenizer.vocab_size, hidden_size=128, intermediate_size=256, num_layers=2,
        num_heads=2, num_kv_heads=1, head_dim=128, rope_theta=1e6, tie_word_embeddings=False, qk_norm=True,
        max_position_embeddings=2048, eos_token_ids=small_tokenizer.eos_token_ids,
    )  # fmt: skip
    params = models.init_params(config, jax.random.key(np.random.randint(2**31)))
    params = dict(params, lm_head=params["lm_head"] * 30)
    model_dir = models.save_pretrained(
        config, params, tmp_path_factory.mktemp("sgl") / "model", tokenizer=small_tokenizer
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(model_dir.parent / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [python, "-m", "sgl_jax.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--attention-backend", "native", "--max-total-tokens", "8192",
         "--disable-precompile", "--dtype", "float32", "--max-running-requests", "8", "--context-length", "512",
         "--disable-overlap-schedule", "--skip-server-warmup"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"sglang-jax did not start; log: {(model_dir.parent / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(1)
        yield url, config, params
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_client_against_sglang_jax(sglang_jax):
    url, config, params = sglang_jax
    rng = np.random.default_rng()
    requests = [
        GenerateRequest(
            tuple(int(t) for t in rng.integers(0, 300, size=int(rng.integers(4, 20)))),
            SamplingParams(max_new_tokens=8, temperature=t, seed=i, ignore_eos=True),
            f"r{i}",
        )
        for i, t in enumerate([0.0, 1.0, 0.0, 1.0])
    ]

    async def go():
        engine = SGLangEngine([url], weight_version="w0")
        try:
            assert await engine.health()
            return await engine.generate(requests)
        finally:
            await engine.close()

    remote = asyncio.run(go())
    ours = asyncio.run(EmbeddedEngine(config, params, max_slots=4, max_context=64).generate(requests))
    for request, r, o in zip(requests, remote, ours):
        assert r.rid == request.rid and r.completion_tokens == 8 and r.finish_reason == "length"
        assert r.weight_version == "w0"  # sglang-jax reports none; the client tags its own
        ids = jnp.asarray([list(request.prompt_ids) + list(r.output_ids)])
        logits = models.forward(config, params, ids)[0, len(request.prompt_ids) - 1 : -1]
        teacher = jax.nn.log_softmax(logits)[jnp.arange(8), jnp.asarray(r.output_ids)]
        # SGLang reports log-probs at temperature 1; sglang-jax's CPU kernels differ from fp32 by up to ~0.07.
        np.testing.assert_allclose(r.logprobs, teacher, atol=0.1)
        if request.sampling.temperature == 0.0:
            assert r.output_ids == o.output_ids
