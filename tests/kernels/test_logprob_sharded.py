"""Vocabulary-sharded fused log-prob on the 8 fake CPU devices, against torch float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_refs import float64_reference, random_case, rel_err
from orchestra_jax.kernels import sharded_fused_logprob

from orchestra_jax.config import MeshConfig
from orchestra_jax.parallel.mesh import make_mesh


def sharded_value_and_grads(mesh, impl, h, w, targets, temperature, g_lp, g_ent, **kwargs):
    def loss(h, w):
        logp, entropy = sharded_fused_logprob(
            h, w, targets, mesh=mesh, temperature=temperature, return_entropy=True, impl=impl, **kwargs
        )
        return jnp.sum(logp * g_lp) + jnp.sum(entropy * g_ent), (logp, entropy)

    (_, (logp, entropy)), (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
    return logp, entropy, dh, dw


@pytest.mark.parametrize(
    "mesh_shape, impl, token_axes",
    [
        ((2, 1, 4), "reference", ("data", "fsdp")),
        ((1, 1, 8), "reference", ()),
        pytest.param((1, 2, 4), "interpret", ("data", "fsdp"), marks=pytest.mark.slow),
    ],
)
def test_sharded_matches_float64(mesh_shape, impl, token_axes):
    mesh = make_mesh(MeshConfig(*mesh_shape))
    seed = np.random.SeedSequence().entropy % 2**32
    # 200 columns per shard at 8 shards would be 25 each: not a multiple of any tile.
    h, w, targets, g_lp, g_ent = random_case(seed, tokens=16, hidden=32, vocab=200)
    got = sharded_value_and_grads(mesh, impl, h, w, targets, 0.8, g_lp, g_ent, token_axes=token_axes)
    want = float64_reference(h, w, targets, 0.8, g_lp, g_ent)
    for name, a, b in zip(("logprob", "entropy", "d_hidden", "d_w"), got, want):
        assert rel_err(a, b) <= 1e-5, (name, seed, rel_err(a, b))
    assert bool(jnp.all(got[0] <= 0.0))


def test_sharded_rejects_shapes_that_do_not_split():
    mesh = make_mesh(MeshConfig(2, 1, 4))
    h, w, targets, _, _ = random_case(0, tokens=6, hidden=8, vocab=30)
    with pytest.raises(ValueError, match="must divide by"):
        sharded_fused_logprob(h, w, targets, mesh=mesh)
