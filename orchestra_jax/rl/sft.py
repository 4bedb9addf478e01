"""Supervised fine-tuning on demonstration trajectories, through the very same train step as RL.

With advantage 1 on every policy token and the old policy equal to the current one (ratio 1, no clipping),
the policy-gradient loss -A * ratio has gradient -d log p: exactly the negative log-likelihood's. So SFT is
the RL step with unit advantages, token-mean weights and no KL; the step's `logprob` metric is -NLL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestra_jax.rl.batching import Sample, pack
from orchestra_jax.rl.train_step import TrainState, TrainStep


class DemonstrationError(ValueError):
    """A demonstrations file that cannot be read, named by file and line."""


def samples_from_trajectories(trajectories: Sequence[Any]) -> list[Sample]:
    """Every training sample of every trajectory, with advantage 1 (imitate all policy tokens)."""
    return [
        Sample(np.asarray(s.token_ids, np.int32), np.asarray(s.loss_mask, np.int32), 1.0,
               np.asarray(s.behaviour_logprobs, np.float32))
        for t in trajectories
        for s in t.samples
    ]


def load_demonstrations(path: str | os.PathLike, vocab_size: int | None = None) -> list[Sample]:
    """Samples from a JSONL of trajectories (`Trajectory.to_json` records, as in trajectories/step_N.jsonl, or
    plain {"token_ids", "loss_mask"} rows)."""
    path = Path(path)
    if not path.is_file():
        raise DemonstrationError(f"{path}: no such demonstrations file")
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows = row["samples"] if "samples" in row else [row]
            for r in rows:
                ids = np.asarray(r["token_ids"], np.int64)
                mask = np.asarray(r["loss_mask"], np.int64)
                if ids.ndim != 1 or ids.shape != mask.shape or len(ids) < 2:
                    raise ValueError("token_ids and loss_mask must be equal-length lists of >= 2 ints")
                if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"token id {int(ids.max())} outside the model's vocabulary of {vocab_size}")
                samples.append(Sample(ids.astype(np.int32), mask.astype(np.int32), 1.0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DemonstrationError(f"{path}:{lineno}: {type(e).__name__}: {e}") from None
    if not samples:
        raise DemonstrationError(f"{path}: no demonstrations")
    return samples


def sft_train(
    train_step: TrainStep,
    state: TrainState,
    samples: Sequence[Sample],
    *,
    steps: int,
    batch_size: int,
    micro_batch_size: int,
    max_row_len: int,
    row_multiple: int,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start: int = 0,
    stop: Callable[[], bool] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Updates `start` .. `steps - 1` on batches drawn (seeded, epoch by epoch without replacement) from
    `samples`; step k gets the same batch whatever `start` is, so a resumed warm start goes on exactly. Returns
    early, before a step, once `stop()` says so (len(history) tells how far it got)."""
    if not samples:
        raise DemonstrationError("SFT needs at least one demonstration")
    rng = np.random.default_rng([seed, 17])
    order: list[int] = []
    history = []
    for step in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(samples)).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        if step < start:
            continue
        if stop is not None and stop():
            break
        batch = pack([samples[i] for i in chosen], micro_batch_size=micro_batch_size, max_row_len=max_row_len,
                     row_multiple=row_multiple)
        state, metrics = train_step(state, batch.arrays)
        metrics["nll"] = -metrics["logprob"]
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return state, history
