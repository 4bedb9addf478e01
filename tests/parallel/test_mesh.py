"""Mesh construction on 1 and 8 devices, the logical-axis rules, and a sharded jitted function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from orchestra_jax.config import MeshConfig
from orchestra_jax.parallel import mesh as M

LAYOUTS = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 4, 2), (4, 1, 2), (2, 4, 1)]


def test_eight_fake_devices_are_present():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape", LAYOUTS)
def test_mesh_layouts_on_eight_devices(shape):
    mesh = M.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_one_device_mesh():
    mesh = M.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert tuple(mesh.shape.values()) == (1, 1, 1)


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [((-1, 1, 1), 8, (8, 1, 1)), ((1, -1, 2), 8, (1, 4, 2)), ((2, 2, -1), 8, (2, 2, 2)), ((-1, 1, 1), 1, (1, 1, 1))],
)
def test_minus_one_takes_the_rest(sizes, devices, expected):
    assert M.resolve_mesh_shape(MeshConfig(*sizes), devices) == expected


@pytest.mark.parametrize("sizes", [(3, -1, 1), (2, 2, 1), (-1, -1, 1)])
def test_impossible_mesh_raises(sizes):
    with pytest.raises(ValueError, match="mesh"):
        M.resolve_mesh_shape(MeshConfig(*sizes), 8)


def test_logical_rules():
    # A mesh axis shards at most one dimension: 'fsdp' is taken by batch, so embed falls back to replicated.
    assert M.logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)
    assert M.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert M.logical_to_spec(("vocab", None)) == P("tensor", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        M.logical_to_spec(("nonsense",))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_jitted_matmul_matches_one_device(shape):
    rng = np.random.default_rng()
    x_BD = rng.normal(size=(16, 32)).astype(np.float32)
    w_DF = rng.normal(size=(32, 24)).astype(np.float32)
    expected = np.tanh(x_BD @ w_DF).sum(axis=0)

    mesh = M.make_mesh(MeshConfig(*shape))
    x_sharding = M.logical_sharding(mesh, ("batch", "embed"))
    w_sharding = M.logical_sharding(mesh, ("embed", "mlp"))
    out_sharding = M.logical_sharding(mesh, ("mlp",))

    @jax.jit
    def f(x, w):
        h_BF = M.with_logical_constraint(jnp.tanh(x @ w), ("batch", "mlp"))
        return h_BF.sum(axis=0)

    with jax.set_mesh(mesh):
        x = jax.device_put(x_BD, x_sharding)
        w = jax.device_put(w_DF, w_sharding)
        out = jax.jit(f, out_shardings=out_sharding)(x, w)
    assert out.sharding == out_sharding
    assert len(x.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_tree_shardings_maps_logical_tuples():
    mesh = M.make_mesh(MeshConfig(1, 4, 2))
    tree = {"embed": ("vocab", "embed"), "layers": {"w": ("layers", "embed", "mlp")}}
    shardings = M.tree_shardings(mesh, tree)
    assert shardings["embed"].spec == P("tensor", "fsdp")
    assert shardings["layers"]["w"].spec == P(None, "fsdp", "tensor")


def test_distributed_settings_from_environment():
    assert M.distributed_settings(MeshConfig(), environ={}) is None
    assert M.distributed_settings(MeshConfig(), environ={"SLURM_NTASKS": "4"}) == {}
    assert M.distributed_settings(MeshConfig(), environ={"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
    explicit = MeshConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    assert M.distributed_settings(explicit, environ={}) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    with pytest.raises(ValueError, match="num_processes"):
        M.distributed_settings(MeshConfig(coordinator_address="h:1"), environ={})
