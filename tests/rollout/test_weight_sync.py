"""Weight sync over HTTP: export safetensors, pause, update from disk, flush, continue, verify the version."""

import contextlib
import dataclasses
import io

import httpx
import jax
import numpy as np
import pytest
from rollout_helpers import post, run, start_server

from orchestra_jax import models
from orchestra_jax.models import transformer
from orchestra_jax.rollout import weight_sync
from orchestra_jax.rollout.engine import GenerateRequest, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.rollout.sglang_client import SGLangEngine


def test_client_update_weights_changes_outputs_and_tags_versions(
    tiny_model, small_tokenizer, tmp_path, capsys
):
    config, params = tiny_model
    rng = np.random.default_rng()
    new_params = transformer.init_params(config, jax.random.key(int(rng.integers(2**31))))
    new_params = dict(new_params, embed=new_params["embed"] * 2)  # less peaked: log-probs visibly change
    servers = [
        start_server(config, params, small_tokenizer, load_weights=models.load_pretrained) for _ in range(2)
    ]
    requests = [
        GenerateRequest(
            tuple(int(t) for t in rng.integers(0, 300, size=6)),
            SamplingParams(max_new_tokens=5, seed=i, ignore_eos=True),
            f"r{i}",
        )
        for i in range(4)
    ]
    try:

        async def go():
            engine = SGLangEngine([s.url for s in servers], config=config, sync_root=str(tmp_path))
            try:
                before = await engine.generate(requests)
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    await engine.update_weights(new_params, "step-1")
                assert "weight sync step-1" in printed.getvalue()
                after = await engine.generate(requests)
                return before, after, engine.last_sync, engine.weight_version
            finally:
                await engine.close()

        before, after, report, version = run(go())
        expected = run(EmbeddedEngine(config, new_params, max_slots=4, max_context=128).generate(requests))
    finally:
        for s in servers:
            s.stop()
    assert version == "step-1" and {c.weight_version for c in before} == {"v0"}
    assert {c.weight_version for c in after} == {"step-1"}
    for a, e in zip(after, expected):
        assert a.output_ids == e.output_ids
        np.testing.assert_allclose(a.logprobs, e.logprobs, atol=1e-5)
    assert any(b.logprobs != a.logprobs for b, a in zip(before, after))
    assert report.bytes_written > 0 and report.path.endswith("weights-step-1")


def test_update_from_bad_path_fails_cleanly(tiny_model, small_tokenizer, tmp_path):
    config, params = tiny_model
    server = start_server(config, params, small_tokenizer, load_weights=models.load_pretrained)
    try:
        response = post(server.url, "/update_weights_from_disk", {"model_path": str(tmp_path / "nope")})
        assert response.status_code == 400 and response.json()["success"] is False
        assert "nope" in response.json()["message"]

        deeper = dataclasses.replace(config, num_layers=config.num_layers + 1)
        path = weight_sync.export_weights(
            deeper, models.init_params(deeper, jax.random.key(0)), tmp_path, "bad"
        )

        async def go():
            async with httpx.AsyncClient(timeout=60) as client:
                await weight_sync.sync_server(client, server.url, str(path), "bad")

        with pytest.raises(weight_sync.WeightSyncError, match="update_weights_from_disk"):
            run(go())
        ok = post(server.url, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
        assert ok.status_code == 200 and ok.json()["meta_info"]["weight_version"] == "v0"
    finally:
        server.stop()
