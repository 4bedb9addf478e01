"""Pallas kernels for the hot maths (log-probs, advantages), with plain-JAX references and one dispatcher.

This folder installs as `orchestra_jax.kernels`, never as a top-level `kernels` (a different PyPI package).
Every public function takes `impl` in ("auto", "pallas", "interpret", "reference"); see dispatch.py.
"""

from orchestra_jax.kernels.advantages import gae, group_advantages
from orchestra_jax.kernels.dispatch import IMPLS, resolve_impl
from orchestra_jax.kernels.logprob import fused_logprob, sharded_fused_logprob
from orchestra_jax.kernels.logprob_reference import naive_logprob

__all__ = [
    "IMPLS",
    "fused_logprob",
    "gae",
    "group_advantages",
    "naive_logprob",
    "resolve_impl",
    "sharded_fused_logprob",
]
