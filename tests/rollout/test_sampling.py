import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestra_jax.rollout import sampling
from orchestra_jax.rollout.engine import RequestError, SamplingParams

sample_jit = jax.jit(sampling.sample_next)


def _rows(n, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0):
    return (
        jnp.full((n,), temperature, jnp.float32),
        jnp.full((n,), top_p, jnp.float32),
        jnp.full((n,), top_k, jnp.int32),
        jnp.full((n,), min_p, jnp.float32),
    )


def _keys(seeds, positions):
    words = np.stack([sampling.seed_words(s) for s in seeds])
    return sampling.token_keys(jnp.asarray(words), jnp.asarray(positions, jnp.int32))


def _empirical(logits_V, n, **kw):
    rng = np.random.default_rng()
    seeds = rng.integers(0, 2**62, size=n)
    logits_BV = jnp.broadcast_to(logits_V, (n, logits_V.shape[0]))
    tokens = sample_jit(logits_BV, _keys(seeds, np.zeros(n)), *_rows(n, **kw))
    return np.bincount(np.asarray(tokens), minlength=logits_V.shape[0]) / n


def test_logprob_is_full_softmax_of_scaled_logits():
    """Each row at its own temperature (0 = greedy counts as 1), over the whole vocabulary."""
    rng = np.random.default_rng()
    hidden_ND = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    tokens_N = jnp.asarray(rng.integers(0, 50, size=6), jnp.int32)
    temperature_N = jnp.asarray([1.0, 0.7, 0.0, 1.3, 0.7, 0.0], jnp.float32)
    logprobs_N = jax.jit(sampling.sampled_logprobs)(hidden_ND, w_DV, tokens_N, temperature_N)
    scale_N = np.where(temperature_N > 0, temperature_N, 1.0)[:, None]
    expected = jax.nn.log_softmax((hidden_ND @ w_DV) / scale_N)[np.arange(6), tokens_N]
    np.testing.assert_allclose(logprobs_N, expected, atol=1e-5)


@pytest.mark.parametrize("vocab", [8192, 1000, 7])
def test_blocked_argmax_matches_numpy_with_ties_and_infinities(vocab):
    rng = np.random.default_rng()
    x_BV = rng.integers(-3, 3, size=(16, vocab)).astype(np.float32)  # many ties
    x_BV[1] = -np.inf
    x_BV[2, rng.integers(vocab)] = np.inf
    x_BV[3, rng.integers(vocab, size=2)] = np.nan
    x_BV[4:] += rng.normal(size=(12, vocab)).astype(np.float32)
    got_B = np.asarray(sampling.argmax(jnp.asarray(x_BV)))
    assert got_B.dtype == np.int32 and 0 <= got_B[3] < vocab  # NaN: an index in range, nothing more
    np.testing.assert_array_equal(np.delete(got_B, 3), np.delete(np.argmax(x_BV, axis=-1), 3))


def test_greedy_and_top_k_1_pick_argmax():
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.normal(size=(8, 300)), jnp.float32)
    keys = _keys(rng.integers(0, 2**62, size=8), np.arange(8))
    greedy = sample_jit(logits, keys, *_rows(8, temperature=0.0))
    top1 = sample_jit(logits, keys, *_rows(8, temperature=1.3, top_k=1))
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    np.testing.assert_array_equal(top1, np.argmax(logits, -1))


def test_sampling_frequencies_match_truncated_softmax():
    rng = np.random.default_rng()
    logits_V = jnp.asarray(rng.normal(size=12), jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits_V / 0.8))
    order = np.argsort(-probs)
    n = 8000
    freq = _empirical(logits_V, n, temperature=0.8)
    np.testing.assert_allclose(freq, probs, atol=0.03)

    freq = _empirical(logits_V, n, temperature=0.8, top_k=3)
    kept = probs.copy()
    kept[order[3:]] = 0
    np.testing.assert_allclose(freq, kept / kept.sum(), atol=0.03)

    top_p = 0.6
    cum = np.cumsum(probs[order])
    nucleus = order[: int(np.searchsorted(cum, top_p) + 1)]
    freq = _empirical(logits_V, n, temperature=0.8, top_p=top_p)
    assert set(np.flatnonzero(freq)) <= set(nucleus)
    kept = np.zeros_like(probs)
    kept[nucleus] = probs[nucleus]
    np.testing.assert_allclose(freq, kept / kept.sum(), atol=0.03)

    min_p = 0.5
    freq = _empirical(logits_V, n, temperature=0.8, min_p=min_p)
    allowed = set(np.flatnonzero(probs >= min_p * probs.max()))
    assert set(np.flatnonzero(freq)) <= allowed


def test_same_seed_and_position_give_same_token_in_any_row():
    rng = np.random.default_rng()
    logits_V = jnp.asarray(rng.normal(size=64), jnp.float32)
    seeds = rng.integers(0, 2**62, size=8)
    positions = rng.integers(0, 1000, size=8)
    tokens = sample_jit(jnp.broadcast_to(logits_V, (8, 64)), _keys(seeds, positions), *_rows(8))
    perm = rng.permutation(8)
    shuffled = sample_jit(jnp.broadcast_to(logits_V, (8, 64)), _keys(seeds[perm], positions[perm]), *_rows(8))
    np.testing.assert_array_equal(np.asarray(tokens)[perm], shuffled)
    # Different positions of one seed draw independently: 8 draws over a flat vocab are rarely all equal.
    flat = sample_jit(jnp.zeros((8, 64)), _keys([seeds[0]] * 8, np.arange(8)), *_rows(8))
    assert len(set(np.asarray(flat).tolist())) > 1


def test_sampling_params_from_sglang_validates():
    params = SamplingParams.from_sglang(
        {"max_new_tokens": 5, "temperature": 1, "stop": "x", "sampling_seed": 3, "skip_special_tokens": True}
    )
    assert params == SamplingParams(max_new_tokens=5, temperature=1.0, stop=("x",), seed=3)
    assert SamplingParams.from_sglang(params.to_sglang()) == params
    for bad, word in [
        ({"temprature": 1.0}, "temprature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 2}, "n"),
        ({"top_k": 0}, "top_k"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
    ]:
        with pytest.raises(RequestError, match=word):
            SamplingParams.from_sglang(bad)
