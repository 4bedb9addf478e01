"""Orbax checkpoints: sharded round trip, keep-N, a half-written step is never picked up, digests."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from orchestra_jax.config import CheckpointConfig, MeshConfig
from orchestra_jax.models.transformer import init_params
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import make_mesh
from orchestra_jax.rl.checkpoint import Checkpointer, CheckpointError, load_params, param_count, params_digest
from orchestra_jax.rl.losses import PolicyLossConfig
from orchestra_jax.rl.train_step import StepSettings, make_train_step


def tiny_state(seed, mesh):
    model = dataclasses.replace(get_preset("qwen3-tiny", vocab_size=64), num_layers=1)
    optimizer = optax.adamw(1e-3)
    _, state = make_train_step(StepSettings(model=model, loss=PolicyLossConfig()), optimizer, mesh,
                               init_params(model, jax.random.key(seed)))
    return state


def test_round_trip_keep_and_half_written(tmp_path):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rng = np.random.default_rng()
    states = [tiny_state(int(rng.integers(1 << 30)), mesh) for _ in range(3)]
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep=2, async_save=True))
    for step, state in enumerate(states, start=1):
        ckpt.save(step, state, {"seed": 7, "data_position": step * 4})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    # A crash mid-save leaves only orbax's temporary directory: it must not count as a checkpoint.
    (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-123" / "garbage").write_text("x")
    reopened = Checkpointer(tmp_path / "ckpt", CheckpointConfig(every_steps=1, keep=2))
    assert reopened.latest_step() == 3
    restored, meta = reopened.restore(states[0])
    assert meta["data_position"] == 12 and meta["step"] == 3 and int(restored.step) == 3
    assert params_digest(restored.params) == params_digest(states[2].params)
    assert params_digest(restored.params) != params_digest(states[1].params)
    assert restored.params["layers"]["q"].sharding == states[0].params["layers"]["q"].sharding
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state), jax.device_get(states[2].opt_state))
    step, params = load_params(tmp_path / "ckpt")
    assert step == 3 and params_digest(params) == params_digest(states[2].params)
    assert param_count(params) == sum(x.size for x in jax.tree.leaves(states[2].params))
    reopened.close()
    ckpt.close()


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_params(tmp_path / "nope")
    ckpt = Checkpointer(tmp_path / "empty", CheckpointConfig())
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.restore(tiny_state(0, make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])))
    ckpt.close()
