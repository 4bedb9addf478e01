"""Pallas kernels for the hot maths (log-probs, advantages), with plain-JAX references and one dispatcher.

This folder installs as `orchestra_jax.kernels`, never as a top-level `kernels` (a different PyPI package).
"""
