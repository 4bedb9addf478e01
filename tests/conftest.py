"""Test set-up: eight fake CPU devices for sharded code, before jax is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout (reference data for tests)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"reference data missing: expected ../shared/data beside the checkout ({SHARED_DATA})")
    return SHARED_DATA
