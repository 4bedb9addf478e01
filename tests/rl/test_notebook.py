"""notebooks/inspect_run.ipynb runs top to bottom on a real test-tiny run (executed with nbclient)."""

import dataclasses
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from orchestra_jax.config import preset
from orchestra_jax.rl.metrics import plot_run
from orchestra_jax.rl.trainer import train

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "inspect_run.ipynb"


@pytest.mark.slow
def test_notebook_and_plot_on_a_test_tiny_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train(dataclasses.replace(preset("test-tiny"), run_dir=str(run)), echo=lambda *_: None) == 0
    png = plot_run(run, tmp_path / "curves.png")
    assert png.stat().st_size > 10_000
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("RUN_DIR", str(run))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trajectories, accuracy" in outputs and "=== task" in outputs
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
