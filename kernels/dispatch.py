"""One rule for every kernel: which implementation runs for `impl`.

"auto" runs the Pallas kernels on GPU (the Triton lowering they are written for) and the plain-JAX reference
elsewhere (CPU, and TPU, where these GPU-style kernels are not tuned or tested); "interpret" runs the Pallas
kernels in interpret mode on any backend (slow; tests use it); "pallas" and "reference" force a choice.
The environment variable ORCHESTRA_JAX_KERNELS (one of the impls) replaces "auto" for the whole process: an
escape hatch for a device where the Pallas lowering misbehaves, without touching every caller.
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
        return "pallas" if backend == "gpu" else "reference"
    if impl == "pallas" and backend == "cpu":
        raise ValueError("impl='pallas' needs a GPU or TPU backend; use impl='interpret' on CPU")
    return impl
