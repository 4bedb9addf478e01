"""Params as an orbax checkpoint item: the format of `<run>/ckpt/<step>/params` and of `convert --to orbax`.

`save_params` is a plain orbax StandardSave of the params tree (orbax writes to a temporary directory and
renames it, so a crash never leaves a readable half). `load_params` restores it onto the shardings of `like`,
or onto the first CPU device when the model is not known yet.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class ParamsError(ValueError):
    """A missing or unreadable params checkpoint; the one-line message names the directory."""


def save_params(params: Any, directory: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        raise ParamsError(f"{directory}: already exists (params are never overwritten in place)")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, params)
        checkpointer.wait_until_finished()
    return directory


def load_params(directory: str | os.PathLike, like: Any = None) -> Any:
    """The params saved in `directory`. `like`: a tree of arrays or ShapeDtypeStructs whose shardings to use."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise ParamsError(f"{directory}: no such params checkpoint directory")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            if like is None:
                metadata = checkpointer.metadata(directory)
                tree = getattr(metadata, "item_metadata", metadata)
                cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
            else:
                target = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
                )
            return checkpointer.restore(directory, target)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ParamsError(f"{directory}: cannot restore params ({message})") from None
