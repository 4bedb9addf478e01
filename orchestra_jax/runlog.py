"""Run directories and TensorBoard logging with tensorboard's own event writer (no TensorFlow needed).

A run directory holds `config.json`, `tb/` (event files), `ckpt/` (orbax) and `trajectories/`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "ckpt"

    @property
    def trajectories(self) -> Path:
        return self.root / "trajectories"


def create_run_dir(root: str | os.PathLike) -> RunDir:
    run = RunDir(Path(root))
    try:
        for path in (run.root, run.tensorboard, run.checkpoints, run.trajectories):
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # the CLI shows it as one line: which run directory, and why
        raise OSError(f"run directory {run.root}: cannot create {e.filename} ({e.strerror})") from None
    return run


def lock_run_dir(run: RunDir) -> Any:
    """An exclusive lock on RUN/.lock, held while the returned file stays open (the kernel drops it when the
    process dies, SIGKILL included): a second run into the same directory would clobber the first's files."""
    handle = open(run.root / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise OSError(f"run directory {run.root}: in use by another run (pid {owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_jsonl_atomic(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Write JSON lines to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _wait_for_a_later_second(logdir: Path) -> None:
    """TensorBoard reads a directory's event files in name order, and a name starts with the second it was made
    in, then the host, the pid and a counter: a second file from one process within the same second could sort
    first (counter 10 after 9), and a resumed log would then be read before the one it replaces."""
    stamps = (re.match(r"events\.out\.tfevents\.(\d+)\.", p.name) for p in logdir.glob("events.out.tfevents.*"))
    seconds = [int(m.group(1)) for m in stamps if m]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


class TensorBoardLogger:
    """Scalars, histograms and text as TensorBoard events, readable by `tensorboard --logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        _wait_for_a_later_second(Path(logdir))
        self._writer = EventFileWriter(str(logdir))

    def _write(self, step: int, value: summary_pb2.Summary.Value) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value]))
        self._writer.add_event(event)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._write(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def histogram(self, tag: str, values: Any, step: int, bins: int = 30) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        counts, edges = np.histogram(values, bins=bins)
        proto = summary_pb2.HistogramProto(
            min=float(values.min()),
            max=float(values.max()),
            num=float(values.size),
            sum=float(values.sum()),
            sum_squares=float(np.square(values).sum()),
            bucket_limit=[float(e) for e in edges[1:]],
            bucket=[float(c) for c in counts],
        )
        self._write(step, summary_pb2.Summary.Value(tag=tag, histo=proto))

    def text(self, tag: str, text: str, step: int) -> None:
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))

    def restart(self, step: int) -> None:
        """Mark a resumed run's first step: TensorBoard (and read_scalars) then drop the events of `step` and later
        that an earlier, killed process logged after its last checkpoint."""
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                               session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in a TensorBoard log directory, as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
