"""The device mesh ('data', 'fsdp', 'tensor') and the one table mapping logical axes onto it.

Tensor code names logical axes only (`embed`, `vocab`, `heads`, ...); `logical_to_spec` turns those into a
`PartitionSpec` through `LOGICAL_RULES`. jax 0.10's `jax.make_mesh` defaults to Explicit axis types, which
breaks GSPMD-style code, so the mesh is built with Auto axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). The whole sharding plan on one screen.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "cache_seq": None,
}


def resolve_mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Sizes for (data, fsdp, tensor); a -1 takes all devices the others leave. Raises ValueError."""
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by the fixed axes ({known})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but {num_devices} are present"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the ('data', 'fsdp', 'tensor') mesh with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    device_grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry these logical names (None = replicated)."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        # A mesh axis may shard only one dimension of a tensor; later dimensions fall back to replicated.
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if any(t in used for t in targets):
            targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def batch_ways(mesh: Mesh) -> int:
    """How many ways a batch's rows split over the mesh (its rows must come in multiples of this)."""
    axes = LOGICAL_RULES["batch"]
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def tree_shardings(mesh: Mesh, logical_tree: Any) -> Any:
    """Map a pytree of logical-axis tuples (one per array) to a pytree of NamedShardings."""
    return jax.tree.map(
        lambda axes: logical_sharding(mesh, axes),
        logical_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
    )


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding inside jit; a no-op outside a mesh context or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def distributed_settings(mesh_config: Any, environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Arguments for jax.distributed.initialize when this is one process of many, else None.

    Explicit flags win; otherwise SLURM's variables describe the job; on a TPU pod jax finds everything
    itself (an empty dict means "call initialize() with no arguments").
    """
    env = os.environ if environ is None else environ
    if mesh_config.coordinator_address:
        if mesh_config.num_processes is None or mesh_config.process_id is None:
            raise ValueError("mesh.coordinator_address needs mesh.num_processes and mesh.process_id")
        return {
            "coordinator_address": mesh_config.coordinator_address,
            "num_processes": mesh_config.num_processes,
            "process_id": mesh_config.process_id,
        }
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}  # jax's SlurmCluster reads SLURM_* itself.
    if env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}  # jax's TPU cluster detection reads the metadata itself.
    return None


def maybe_initialize_distributed(mesh_config: Any) -> bool:
    """Call jax.distributed.initialize when the environment says this is one process of many."""
    settings = distributed_settings(mesh_config)
    if settings is None:
        return False
    jax.distributed.initialize(**settings)
    return True
