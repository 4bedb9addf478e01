"""`inspect curves` prints each curve's first- and last-span means from a run's TensorBoard events."""

import random

import numpy as np

from orchestra_jax.cli import main
from orchestra_jax.rl.metrics import curve_summary
from orchestra_jax.runlog import TensorBoardLogger


def test_summary_means_match_the_logged_values(tmp_path, capsys):
    rng = random.Random()
    accuracy = [rng.random() for _ in range(25)]
    with TensorBoardLogger(tmp_path / "tb") as tb:
        for step, a in enumerate(accuracy, start=1):
            tb.scalars({"rollout/accuracy": a, "tools/expert_calls_per_episode": 1 - a, "optim/lr": 1e-3}, step)
    stored = np.array(accuracy, np.float32).astype(np.float64)  # TensorBoard keeps float32
    expected = (f"rollout/accuracy: first 10 steps {stored[:10].mean():.6g}, "
                f"last 10 steps {stored[-10:].mean():.6g} (25 steps)")
    lines = curve_summary(tmp_path, span=10)
    assert lines[0] == expected
    assert len(lines) == 2 and lines[1].startswith("tools/expert_calls_per_episode:")  # optim/lr is not a curve
    assert main(["inspect", "curves", str(tmp_path), str(tmp_path / "c.png")]) == 0
    assert expected in capsys.readouterr().out and (tmp_path / "c.png").is_file()
