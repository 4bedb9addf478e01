"""impl dispatch: CPU default, the environment override, bad names."""

import pytest
from orchestra_jax.kernels import resolve_impl


def test_environment_override_of_auto(monkeypatch):
    monkeypatch.delenv("ORCHESTRA_JAX_KERNELS", raising=False)
    assert resolve_impl("auto") == "reference"  # the default on every backend
    monkeypatch.setenv("ORCHESTRA_JAX_KERNELS", "interpret")
    assert resolve_impl("auto") == "interpret" and resolve_impl("reference") == "reference"
    monkeypatch.setenv("ORCHESTRA_JAX_KERNELS", "fast")
    with pytest.raises(ValueError, match="ORCHESTRA_JAX_KERNELS='fast'"):
        resolve_impl("auto")
