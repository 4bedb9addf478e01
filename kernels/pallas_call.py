"""One wrapper around pl.pallas_call for every kernel here: GPU compiler parameters and output poisoning."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def call(
    kernel: Callable,
    *,
    grid: tuple[int, ...],
    in_specs: Sequence[pl.BlockSpec],
    out_specs: Sequence[pl.BlockSpec],
    out_shape: Sequence[jax.ShapeDtypeStruct],
    args: Sequence[jax.Array],
    interpret: bool,
    poison: bool = False,
) -> tuple[jax.Array, ...]:
    """Run `kernel` over `grid`. With poison, every output buffer starts as NaN (aliased inputs), so a test
    sees any element the kernel forgot to write."""
    params = {}
    if not interpret and jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as plt

        params["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=2)
    args, in_specs = tuple(args), tuple(in_specs)
    if poison:
        n_in, n_out = len(args), len(out_shape)
        args += tuple(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape)
        in_specs += tuple(out_specs)
        params["input_output_aliases"] = {n_in + k: k for k in range(n_out)}
        inner = kernel

        def kernel(*refs):
            return inner(*refs[:n_in], *refs[n_in + n_out :])

    return tuple(
        pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            out_shape=tuple(out_shape),
            interpret=interpret,
            **params,
        )(*args)
    )
