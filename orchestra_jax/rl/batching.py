"""Pack variable-length trajectories into fixed-shape batches of rows with segment ids (no padding waste).

Each sample's tokens are laid into a row at some offset; next-token targets, loss weights, advantages and
behaviour log-probs are aligned to the *input* position that predicts them (position i predicts token i+1),
so the last token of every segment predicts nothing (weight 0). Segment ids start at 1 per row; 0 is padding.
Shapes are bucketed (row length, micro-batch count, and the rows of a lone micro-batch, each to a small set) so
jit compiles a few programs, not one per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestra_jax.rl.losses import Aggregation, aggregation_weights

FIELDS = (
    "tokens", "targets", "positions", "segment_ids", "weights", "advantages", "behaviour_logprobs", "rewards"
)


@dataclass(frozen=True)
class Sample:
    """One training sequence: token ids, which tokens the policy produced (loss mask), its advantage.

    behaviour_logprobs (same length as token_ids; anything where the mask is 0) are the engine's log-probs of
    the sampled tokens; reward is the scalar outcome placed on the last policy token (used by PPO's GAE);
    ref_logprobs, laid out like behaviour_logprobs, are the frozen reference's (for the KL).
    """

    token_ids: np.ndarray
    loss_mask: np.ndarray
    advantage: float
    behaviour_logprobs: np.ndarray | None = None
    reward: float = 0.0
    ref_logprobs: np.ndarray | None = None


@dataclass(frozen=True)
class PackedBatch:
    """Arrays of shape [micro_batches, rows, row_len] (a dict of numpy arrays in `arrays`) and bookkeeping."""

    arrays: dict[str, np.ndarray]
    num_samples: int
    num_loss_tokens: int
    num_tokens: int
    truncated: int
    spans: tuple[tuple[int, int, int, int, int], ...] = ()
    """Where each sample landed, in the samples' order: (micro-batch, row, offset, tokens kept, its length)."""

    def per_sample(self, values: np.ndarray) -> list[np.ndarray]:
        """Split a [micro_batches, rows, row_len] array of per-position values (position i: the log-prob of
        token i + 1, as the step computes them) back into per-sample arrays laid out like
        Sample.behaviour_logprobs (index k: token k; 0 at k = 0 and past a truncation)."""
        out = []
        for m, r, offset, n, length in self.spans:
            sample = np.zeros(length, np.float32)
            sample[1:n] = values[m, r, offset : offset + n - 1]
            out.append(sample)
        return out

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.arrays["tokens"].shape  # type: ignore[return-value]


def bucket_length(n: int, minimum: int = 32) -> int:
    """The next of ..., 256, 384, 512, 768, 1024, ... >= n (at least `minimum`): few compiled row lengths, and
    at most 1.5x padding (attention cost grows with the square of the row length)."""
    return max(minimum, _bucket_count(n))


def _bucket_count(n: int) -> int:
    """Round a micro-batch count up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most 1.5x waste)."""
    power = 1
    while True:
        for size in (power, 3 * power // 2):
            if size >= n:
                return size
        power *= 2


def split_minibatches(num_samples: int, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle sample indices and cut them into `parts` near-equal, non-empty mini-batches (fewer when there
    are fewer samples than parts). One part keeps the original order."""
    order = rng.permutation(num_samples) if parts > 1 else np.arange(num_samples)
    return [chunk for chunk in np.array_split(order, min(parts, max(num_samples, 1))) if chunk.size]


def pack(
    samples: Sequence[Sample],
    *,
    micro_batch_size: int,
    max_row_len: int,
    row_multiple: int,
    aggregation: Aggregation = "token-mean",
    one_per_row: bool = False,
    min_row_len: int = 32,
) -> PackedBatch:
    """First-fit-decreasing packing of samples into rows; rows grouped into micro-batches of `micro_batch_size`.

    A sample longer than `max_row_len` keeps its first `max_row_len` tokens (counted in `truncated`).
    `one_per_row` puts each sample alone in its row (PPO's GAE runs along rows). Rows that fit in one
    micro-batch get one of only the rows they need (bucketed, a multiple of `row_multiple`: the devices the rows
    split over, `parallel.mesh.batch_ways`), not `micro_batch_size` rows of which most would be padding the step
    computes anyway.
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    lengths = [min(len(s.token_ids), max_row_len) for s in samples]
    truncated = sum(len(s.token_ids) > max_row_len for s in samples)
    row_len = min(bucket_length(max(lengths, default=1), min_row_len), max_row_len)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        target = next((r for r, free in enumerate(room) if free >= lengths[i]), None) if not one_per_row else None
        if target is None:
            rows.append([])
            room.append(row_len)
            target = len(rows) - 1
        rows[target].append(i)
        room[target] -= lengths[i]
    per_micro = micro_batch_size
    if len(rows) < micro_batch_size:
        per_micro = min(micro_batch_size, -(-_bucket_count(max(1, len(rows))) // row_multiple) * row_multiple)
    num_micro = _bucket_count(max(1, -(-len(rows) // per_micro)))
    total_rows = num_micro * per_micro

    out = {
        "tokens": np.zeros((total_rows, row_len), np.int32),
        "targets": np.zeros((total_rows, row_len), np.int32),
        "positions": np.zeros((total_rows, row_len), np.int32),
        "segment_ids": np.zeros((total_rows, row_len), np.int32),
        "mask": np.zeros((total_rows, row_len), np.float32),
        "sequence": np.full((total_rows, row_len), -1, np.int64),
        "advantages": np.zeros((total_rows, row_len), np.float32),
        "behaviour_logprobs": np.zeros((total_rows, row_len), np.float32),
        "rewards": np.zeros((total_rows, row_len), np.float32),
    }
    with_reference = bool(samples) and all(s.ref_logprobs is not None for s in samples)
    if with_reference:
        out["ref_logprobs"] = np.zeros((total_rows, row_len), np.float32)
    spans = [(0, 0, 0, 0, 0)] * len(samples)
    for r, members in enumerate(rows):
        offset = 0
        for segment, i in enumerate(members, start=1):
            s, n = samples[i], lengths[i]
            span = slice(offset, offset + n)
            ids = np.asarray(s.token_ids[:n], np.int32)
            out["tokens"][r, span] = ids
            out["targets"][r, offset : offset + n - 1] = ids[1:]
            out["positions"][r, span] = np.arange(n)
            out["segment_ids"][r, span] = segment
            out["sequence"][r, span] = i
            mask = np.asarray(s.loss_mask[:n], np.float32)[1:]
            out["mask"][r, offset : offset + n - 1] = mask
            out["advantages"][r, offset : offset + n - 1] = s.advantage * (mask > 0)
            if s.behaviour_logprobs is not None:
                out["behaviour_logprobs"][r, offset : offset + n - 1] = np.asarray(s.behaviour_logprobs[:n])[1:]
            if with_reference:
                out["ref_logprobs"][r, offset : offset + n - 1] = np.asarray(s.ref_logprobs[:n])[1:]
            spans[i] = (r // per_micro, r % per_micro, offset, n, len(s.token_ids))
            policy = np.nonzero(mask > 0)[0]
            if policy.size:
                out["rewards"][r, offset + policy[-1]] = s.reward
            offset += n
    num_loss_tokens = int(out["mask"].sum())
    out["weights"] = aggregation_weights(out["mask"], out["sequence"], aggregation)
    keys = (*FIELDS, "mask", "ref_logprobs") if with_reference else (*FIELDS, "mask")
    arrays = {k: out[k].reshape(num_micro, per_micro, row_len) for k in keys}
    return PackedBatch(
        arrays=arrays,
        num_samples=len(samples),
        num_loss_tokens=num_loss_tokens,
        num_tokens=int(sum(lengths)),
        truncated=int(truncated),
        spans=tuple(spans),
    )
