"""The embedded sampler on a (data=4, tensor=2) mesh of 8 fake CPU devices gives the unsharded tokens."""

import asyncio

import jax
import numpy as np
import pytest

from orchestra_jax import models
from orchestra_jax.config import MeshConfig
from orchestra_jax.parallel.mesh import make_mesh
from orchestra_jax.rollout.engine import GenerateRequest, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine


@pytest.mark.slow  # ~15 s of CPU compiling for 8 devices
def test_tensor_parallel_decode_matches_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices that tests/conftest.py sets up")
    rng = np.random.default_rng()
    config = models.get_preset("qwen3-tiny", 512)
    params = models.init_params(config, jax.random.key(int(rng.integers(2**31))))
    params = dict(params, embed=params["embed"] * 8)
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    requests = [
        GenerateRequest(
            tuple(int(t) for t in rng.integers(0, 512, size=int(rng.integers(3, 16)))),
            SamplingParams(max_new_tokens=8, temperature=t, seed=i, ignore_eos=True),
            f"r{i}",
        )
        for i, t in enumerate([0.0, 1.0, 0.7, 1.0])  # one prefill bucket: few compilations
    ]

    async def go(mesh_or_none):
        engine = EmbeddedEngine(config, params, max_slots=4, max_context=64, mesh=mesh_or_none)
        return await engine.generate(requests), engine

    sharded, engine = asyncio.run(go(mesh))
    single, _ = asyncio.run(go(None))
    assert len(engine._cache["k"].sharding.device_set) == 8
    assert engine._params["embed"].sharding.spec[0] == "tensor"  # vocab rows split over the tensor axis
    for s, u in zip(sharded, single):
        assert s.output_ids == u.output_ids
        np.testing.assert_allclose(s.logprobs, u.logprobs, atol=1e-4)
