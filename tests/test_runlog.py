"""TensorBoard events written with tensorboard's own writer read back through its EventAccumulator."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestra_jax.runlog import (
    TensorBoardLogger,
    create_run_dir,
    lock_run_dir,
    read_scalars,
    write_jsonl_atomic,
)


def test_scalars_histograms_and_text_read_back(tmp_path):
    rng = np.random.default_rng()
    run = create_run_dir(tmp_path / "run")
    values = rng.normal(size=5)
    samples = rng.normal(size=200)
    with TensorBoardLogger(run.tensorboard) as tb:
        for step, v in enumerate(values):
            tb.scalars({"reward/mean": v, "train/lr": 1e-6}, step)
        tb.histogram("reward/hist", samples, step=3)
        tb.text("trajectories/sample", "<tool_call>{}</tool_call> ünïcode", step=3)

    scalars = read_scalars(run.tensorboard)
    assert [s for s, _ in scalars["reward/mean"]] == list(range(5))
    np.testing.assert_allclose([v for _, v in scalars["reward/mean"]], values, rtol=1e-6)

    acc = EventAccumulator(str(run.tensorboard), size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    histo = acc.Histograms("reward/hist")[0].histogram_value
    assert histo.num == 200 and np.isclose(histo.sum, samples.sum())
    assert sum(histo.bucket) == 200
    text = acc.Tensors("trajectories/sample")[0].tensor_proto.string_val[0].decode()
    assert text == "<tool_call>{}</tool_call> ünïcode"


def test_run_dir_layout_and_atomic_jsonl(tmp_path):
    run = create_run_dir(tmp_path / "r")
    for sub in ("tb", "ckpt", "trajectories"):
        assert (run.root / sub).is_dir()
    write_jsonl_atomic(run.trajectories / "step_1.jsonl", [{"a": 1}, {"b": "ü"}])
    lines = (run.trajectories / "step_1.jsonl").read_text().splitlines()
    assert lines == ['{"a": 1}', '{"b": "ü"}']
    assert len(list(run.trajectories.iterdir())) == 1


def test_a_run_dir_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError) as caught:
        create_run_dir(blocker / "run")
    message = str(caught.value)
    assert message.startswith(f"run directory {blocker / 'run'}: cannot create") and "\n" not in message


def test_a_restarted_log_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    run = create_run_dir(tmp_path / "run")
    with TensorBoardLogger(run.tensorboard) as tb:  # the killed run: steps 1-4, its last checkpoint at 3
        for step in range(1, 5):
            tb.scalar("reward/mean", float(step), step)
    with TensorBoardLogger(run.tensorboard) as tb:  # the resumed one redoes step 4
        tb.restart(4)
        for step in (4, 5):
            tb.scalar("reward/mean", 10.0 * step, step)
    assert read_scalars(run.tensorboard)["reward/mean"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    # TensorBoard reads files in name order: the second file's name starts with a later second than the first's
    # (within one second, the writer's counter decides, and 10 sorts before 9)
    first, second = sorted(p.name.split(".")[3] for p in run.tensorboard.glob("events.out.tfevents.*"))
    assert int(second) > int(first)


def test_a_run_directory_takes_one_run_at_a_time(tmp_path):
    run = create_run_dir(tmp_path / "run")
    held = lock_run_dir(run)
    with pytest.raises(OSError, match=rf"run directory .*run: in use by another run \(pid {os.getpid()}\)"):
        lock_run_dir(run)
    held.close()  # as when the first process exits, however it ends
    lock_run_dir(run).close()
