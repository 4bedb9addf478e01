"""A jitted forward+backward on fsdp x tensor meshes of 8 fake CPU devices matches the one-device result."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestra_jax.config import MeshConfig
from orchestra_jax.models import transformer as T
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import logical_sharding, make_mesh, tree_shardings

# Every sharded dimension divides 8: heads 8, kv heads 8, hidden 64, mlp 128, vocab 128.
CONFIG = dataclasses.replace(
    get_preset("qwen3-tiny", vocab_size=128), num_heads=8, num_kv_heads=8, head_dim=8
)


def _loss(params, ids_BT, segments_BT):
    logits_BTV = T.forward(CONFIG, params, ids_BT, segment_ids_BT=segments_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV)
    targets_BT = jnp.roll(ids_BT, -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1))


@pytest.fixture(scope="module")
def reference():
    seed = np.random.randint(1 << 30)
    params = T.init_params(CONFIG, jax.random.key(seed))
    ids = jax.random.randint(jax.random.key(seed + 1), (4, 12), 0, CONFIG.vocab_size)
    segments = jnp.ones((4, 12), jnp.int32).at[1, 9:].set(0)
    loss, grads = jax.jit(jax.value_and_grad(_loss))(params, ids, segments)
    return params, ids, segments, loss, grads


@pytest.mark.parametrize(
    "shape",
    [
        (1, 4, 2),
        pytest.param((2, 2, 2), marks=pytest.mark.slow),
        pytest.param((1, 1, 8), marks=pytest.mark.slow),
    ],
)
def test_sharded_forward_backward_matches_one_device(reference, shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    params, ids, segments, ref_loss, ref_grads = reference
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    param_shardings = tree_shardings(mesh, T.param_logical_axes(CONFIG))
    batch_sharding = logical_sharding(mesh, ("batch", "seq"))
    sharded_params = jax.device_put(params, param_shardings)
    assert sharded_params["layers"]["q"].sharding.spec == param_shardings["layers"]["q"].spec
    step = jax.jit(
        jax.value_and_grad(_loss),
        in_shardings=(param_shardings, batch_sharding, batch_sharding),
        out_shardings=(None, param_shardings),
    )
    with jax.set_mesh(mesh):
        loss, grads = step(
            sharded_params, jax.device_put(ids, batch_sharding), jax.device_put(segments, batch_sharding)
        )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert grads["layers"]["gate"].sharding.spec == param_shardings["layers"]["gate"].spec


def test_load_pretrained_places_each_tensor_with_its_sharding(reference, tmp_path):
    from orchestra_jax.models import load_pretrained, save_pretrained

    params = reference[0]
    save_pretrained(CONFIG, params, tmp_path / "ckpt")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    config, loaded = load_pretrained(tmp_path / "ckpt", mesh=mesh)
    expected = tree_shardings(mesh, T.param_logical_axes(config))
    for leaf, sharding, ref in zip(
        jax.tree.leaves(loaded), jax.tree.leaves(expected), jax.tree.leaves(params)
    ):
        assert leaf.sharding == sharding
        np.testing.assert_array_equal(leaf, ref)
