"""One rule for every kernel: which implementation runs for `impl`.

"auto" runs the plain-JAX reference on every backend: on an H100 (2026-11-27, notes/DEVICE_NOTES.md) the
chunked XLA log-prob path ran forward+backward 3.5-7x faster than these Triton-lowered Pallas kernels, and the
Qwen3-0.6B train step 1.2-1.3x faster with it. "pallas" forces the kernels (GPU; TPU untested), "interpret" runs
them in interpret mode on any backend (slow; tests use it), "reference" forces the reference.
The environment variable ORCHESTRA_JAX_KERNELS (one of the impls) replaces "auto" for the whole process, so a
run can switch to the kernels without touching every caller.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "ORCHESTRA_JAX_KERNELS"
IMPLS = ("auto", "pallas", "interpret", "reference")


def resolve_impl(impl: str) -> str:
    """'pallas', 'interpret' or 'reference' for this process's default backend. Raises ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "auto" and os.environ.get(ENV_VAR, "auto") != "auto":
        impl = os.environ[ENV_VAR]
        if impl not in IMPLS:
            raise ValueError(f"{ENV_VAR}={impl!r}: choose one of {', '.join(IMPLS)}")
    backend = jax.default_backend()
    if impl == "auto":
        return "reference"
    if impl == "pallas" and backend == "cpu":
        raise ValueError("impl='pallas' needs a GPU or TPU backend; use impl='interpret' on CPU")
    return impl
