"""kernels/ installs as orchestra_jax.kernels (never as a top-level `kernels`), editable and from a wheel."""

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, orchestra_jax.kernels as k, orchestra_jax;"
    "print(k.__file__); print(orchestra_jax.__file__);"
    "print(importlib.util.find_spec('kernels') is None or 'orchestra' not in (importlib.util.find_spec('kernels').origin or ''))"
)


def _declared_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared():
    found = {"orchestra_jax." + ".".join(p.parent.relative_to(ROOT / "orchestra_jax").parts) for p in (ROOT / "orchestra_jax").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found}
    found |= {"orchestra_jax.kernels" + "".join("." + part for part in p.parent.relative_to(ROOT / "kernels").parts) for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found <= _declared_packages(), f"add to pyproject packages: {sorted(found - _declared_packages())}"


def test_editable_install_maps_kernels(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, package_file, no_top_level = out.stdout.split()
    assert pathlib.Path(kernels_file).parent == ROOT / "kernels"
    assert no_top_level == "True"


@pytest.mark.timeout(300)
def test_wheel_install_maps_kernels(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("orchestra_jax-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    assert not (target / "kernels").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    kernels_file, package_file, no_top_level = out.stdout.split()
    assert pathlib.Path(kernels_file).is_relative_to(target)
    assert pathlib.Path(package_file).is_relative_to(target)
    assert no_top_level == "True"
