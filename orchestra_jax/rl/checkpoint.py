"""Orbax checkpoints of a training run: params, critic, optimizer state, and a JSON `meta` item.

Layout per step (the CheckpointManager's): `<run>/ckpt/<step>/{params, critic, opt_state, meta}`. The `params`
item is a plain StandardSave of the policy tree, the format models.params_io reads, so `orchestra-jax convert`
can take a step directory. Orbax writes each step into a temporary directory and renames it when complete,
so a half-written checkpoint (a crash or SIGKILL mid-save) is never listed, never restored.
`meta` holds the step, the seed, the data position and the resolved config: all a resume needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from orchestra_jax.config import CheckpointConfig
from orchestra_jax.rl.train_step import TrainState


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint, phrased as one line naming the directory."""


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding, so orbax restores straight onto the mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Saves every `every_steps` (or when forced), keeps the newest `keep`, optionally asynchronously."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            save_interval_steps=config.every_steps,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` as `step` (returns False when the interval says skip). Async saves finish later;
        `wait()` blocks until they are durable."""
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "meta": ocp.args.JsonSave({**meta, "step": int(step)}),
        }
        if jax.tree.leaves(state.critic):
            items["critic"] = ocp.args.StandardSave(state.critic)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at `step` (default: the latest), laid out like `like` (same tree, shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        items = {
            "params": ocp.args.StandardRestore(_abstract(like.params)),
            "opt_state": ocp.args.StandardRestore(_abstract(like.opt_state)),
            "meta": ocp.args.JsonRestore(),
        }
        if jax.tree.leaves(like.critic):
            items["critic"] = ocp.args.StandardRestore(_abstract(like.critic))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: {e})") from None
        meta = dict(restored["meta"])
        step_array = jax.device_put(np.int32(meta["step"]), like.step.sharding)
        critic = restored["critic"] if "critic" in items else like.critic
        state = TrainState(step=step_array, params=restored["params"], critic=critic, opt_state=restored["opt_state"])
        return state, meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(directory: str | os.PathLike, step: int | None = None) -> tuple[int, Any]:
    """(step, params as numpy arrays) from a run's checkpoint directory, without knowing the model."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step() if step is None else step
    manager.close()
    if step is None:
        raise CheckpointError(f"{directory}: no complete checkpoint")
    path = directory / str(step) / "params"
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing the params item")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a step's item has no metadata file of its own
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
            params = checkpointer.restore(path, target)
    except Exception as e:  # orbax and tensorstore raise many kinds; a damaged item is one line either way
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    finally:
        absl_logger.setLevel(level)
    return step, jax.tree.map(np.asarray, params)


def params_digest(params: Any) -> str:
    """SHA-256 over every parameter array in path order: path, dtype, shape, then the raw bytes.

    Two runs with bitwise-identical params print the same digest (what the resume test compares).
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def param_count(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
