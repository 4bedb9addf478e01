"""Packing trajectories into fixed-shape rows with segment ids."""

import numpy as np

from orchestra_jax.rl.batching import Sample, bucket_length, pack, split_minibatches


def random_samples(rng, n, max_len=40):
    samples = []
    for i in range(n):
        length = int(rng.integers(2, max_len))
        mask = (rng.random(length) < 0.6).astype(np.int32)
        samples.append(
            Sample(
                token_ids=rng.integers(1, 100, length),
                loss_mask=mask,
                advantage=float(rng.normal()),
                behaviour_logprobs=-rng.random(length),
                reward=float(i),
            )
        )
    return samples


def test_pack_round_trips_every_sample():
    rng = np.random.default_rng()
    samples = random_samples(rng, 13)
    batch = pack(samples, micro_batch_size=2, max_row_len=64, row_multiple=1)
    a = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.arrays.items()}
    m, b, t = batch.shape
    assert b == 2 and t == bucket_length(max(len(s.token_ids) for s in samples))
    found = 0
    for r in range(m * b):
        for seg in range(1, a["segment_ids"][r].max() + 1):
            idx = np.nonzero(a["segment_ids"][r] == seg)[0]
            assert np.all(np.diff(idx) == 1)
            np.testing.assert_array_equal(a["positions"][r, idx], np.arange(len(idx)))
            tokens = a["tokens"][r, idx]
            match = [s for s in samples if len(s.token_ids) == len(idx) and np.array_equal(s.token_ids, tokens)]
            assert len(match) == 1
            s = match[0]
            np.testing.assert_array_equal(a["targets"][r, idx[:-1]], s.token_ids[1:])
            np.testing.assert_array_equal(a["mask"][r, idx[:-1]], s.loss_mask[1:])
            assert a["mask"][r, idx[-1]] == 0
            np.testing.assert_allclose(a["advantages"][r, idx[:-1]], s.advantage * s.loss_mask[1:], rtol=1e-6)
            np.testing.assert_allclose(a["behaviour_logprobs"][r, idx[:-1]], s.behaviour_logprobs[1:], rtol=1e-6)
            found += 1
    assert found == len(samples)
    assert batch.num_loss_tokens == sum(int(s.loss_mask[1:].sum()) for s in samples)
    np.testing.assert_allclose(a["weights"].sum(), 1.0, rtol=1e-5)
    # Packing beats one sample per row.
    assert m * b < len(samples) or len(samples) <= 2


def test_truncation_and_one_per_row():
    rng = np.random.default_rng()
    samples = random_samples(rng, 5, max_len=30) + [Sample(np.arange(1, 101), np.ones(100), 1.0)]
    batch = pack(samples, micro_batch_size=4, max_row_len=64, row_multiple=1, one_per_row=True)
    assert batch.truncated == 1 and batch.shape[-1] == 64
    seg = batch.arrays["segment_ids"].reshape(-1, 64)
    assert seg.max() == 1 and (seg.max(axis=1) == 1).sum() == 6
    assert batch.shape[0] * batch.shape[1] % 4 == 0


def test_a_lone_micro_batch_holds_only_the_rows_it_needs():
    """Two long samples under micro_batch_size 8 make a [1, 2, L] batch, not [1, 8, L] of mostly padding; the
    row count stays a multiple of the data-parallel devices and never exceeds the micro-batch size."""
    rng = np.random.default_rng()
    long = [Sample(rng.integers(1, 100, 60), np.ones(60, np.int32), 1.0) for _ in range(2)]
    assert pack(long, micro_batch_size=8, max_row_len=64, row_multiple=1).shape == (1, 2, 64)
    assert pack(long, micro_batch_size=8, max_row_len=64, row_multiple=4).shape == (1, 4, 64)
    five = long + [Sample(rng.integers(1, 100, 60), np.ones(60, np.int32), 1.0) for _ in range(3)]
    assert pack(five, micro_batch_size=8, max_row_len=64, row_multiple=1).shape == (1, 6, 64)  # 1, 2, 3, 4, 6, 8
    # several micro-batches: full ones
    assert pack(five, micro_batch_size=4, max_row_len=64, row_multiple=1).shape == (2, 4, 64)
    batch = pack(five, micro_batch_size=8, max_row_len=64, row_multiple=4)
    assert batch.shape == (1, 8, 64)
    got = batch.per_sample(batch.arrays["targets"].astype(np.float64))
    assert all((g[1:] == s.token_ids[1:]).all() for g, s in zip(got, five))


def test_minibatches_partition_the_samples():
    rng = np.random.default_rng()
    n, parts = int(rng.integers(5, 60)), int(rng.integers(2, 6))
    chunks = split_minibatches(n, parts, rng)
    assert len(chunks) == parts and sorted(np.concatenate(chunks).tolist()) == list(range(n))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert [c.tolist() for c in split_minibatches(n, 1, rng)] == [list(range(n))]  # one part: original order
    assert len(split_minibatches(3, 8, rng)) == 3 and split_minibatches(0, 4, rng) == []


def test_reference_logprobs_pack_and_come_back_per_sample():
    """Each sample's ref log-probs land beside its behaviour ones, and per_sample undoes the packing (a sample
    cut at max_row_len gets 0 past the cut)."""
    rng = np.random.default_rng()
    samples = [Sample(rng.integers(1, 100, n), np.ones(n, np.int32), 0.0, -rng.random(n), 0.0, -rng.random(n))
               for n in rng.integers(2, 40, 9)]
    samples.append(Sample(rng.integers(1, 100, 70), np.ones(70, np.int32), 0.0, None, 0.0, -rng.random(70)))
    batch = pack(samples, micro_batch_size=2, max_row_len=64, row_multiple=1)
    assert batch.truncated == 1
    back = batch.per_sample(batch.arrays["ref_logprobs"])
    for s, b in zip(samples, back):
        kept = min(len(s.token_ids), 64)
        assert b.shape == (len(s.token_ids),) and b[0] == 0 and not b[kept:].any()
        np.testing.assert_array_equal(b[1:kept], s.ref_logprobs[1:kept].astype(np.float32))
    assert "ref_logprobs" not in pack(samples[:-1] + [Sample(np.arange(5), np.ones(5), 0.0)], micro_batch_size=2,
                                      max_row_len=64, row_multiple=1).arrays  # only when every sample has them
