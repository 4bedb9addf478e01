"""Next-token sampling maths: temperature, top-k, top-p, min-p, with one PRNG key per (request seed, position).

Every row carries its own settings, so one jitted call serves a batch of requests with mixed parameters. A
token's key is `fold_in(key(seed), position)`: the same seed gives the same tokens whichever other requests
share the batch and whichever slot the request lands in.

A sampled token's log-probability is taken under softmax(logits / temperature) over the whole vocabulary
(temperature 0 counts as 1), i.e. before truncation. This is what a trainer recomputes with the same
temperature; SGLang reports the same quantity at temperature 1 (its "unprocessed" log-probs). It goes through
the same fused log-prob API as the trainer, from the final-normed hidden states (`sampled_logprobs`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from orchestra_jax.kernels import fused_logprob

SEED_WORDS = 2  # a seed in [0, 2**63) travels as two uint32 words (threefry key data)


def seed_words(seed: int) -> np.ndarray:
    """The uint32[2] key data of a 63-bit seed."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], dtype=np.uint32)


def token_keys(seed_words_B2: jax.Array, positions_B: jax.Array) -> jax.Array:
    """One PRNG key per row: the request's seed folded with the position of the token being sampled."""

    def one(words_2, position):
        return jax.random.fold_in(jax.random.wrap_key_data(words_2, impl="threefry2x32"), position)

    return jax.vmap(one)(seed_words_B2, positions_B)


def truncation_mask(
    scaled_BV: jax.Array, top_p_B: jax.Array, top_k_B: jax.Array, min_p_B: jax.Array
) -> jax.Array:
    """Tokens that survive top-k (k <= 0: off), top-p and min-p. The most likely token always survives.

    Each rule keeps a prefix of the tokens sorted by probability, so their intersection is a prefix too; a
    token is kept when its logit reaches the logit at the end of that prefix (ties at the edge are kept).
    """
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    rank_V = jnp.arange(scaled_BV.shape[-1])
    cumulative_BV = jnp.cumsum(probs_BV, axis=-1)
    keep_BV = (top_k_B[:, None] <= 0) | (rank_V[None, :] < top_k_B[:, None])
    keep_BV &= (cumulative_BV - probs_BV) < top_p_B[:, None]
    keep_BV &= probs_BV >= min_p_B[:, None] * probs_BV[:, :1]
    keep_BV = keep_BV.at[:, 0].set(True)
    last_kept_B = jnp.sum(keep_BV, axis=-1) - 1
    threshold_B = jnp.take_along_axis(sorted_BV, last_kept_B[:, None], axis=-1)
    return scaled_BV >= threshold_B


def logprob_temperature(temperature_B: jax.Array) -> jax.Array:
    """The temperature of the distribution a token is scored under: a greedy row (0) counts as 1."""
    return jnp.where(temperature_B > 0, temperature_B, 1.0)


ARGMAX_BLOCK = 128


def argmax(x_BV: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum) -> int32 [B]; a row holding NaN gets some index in range.

    XLA's CPU argmax is a scalar (value, index) reduction, ~7x slower on [8, 8192] than this: the maximum of
    each 128-wide block, the first block holding the row's maximum, then the argmax inside that block alone.
    """
    b, v = x_BV.shape
    pad = (-v) % ARGMAX_BLOCK
    if pad:
        x_BV = jnp.pad(x_BV, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    x_BNC = x_BV.reshape(b, -1, ARGMAX_BLOCK)
    block_B = jnp.argmax(jnp.max(x_BNC, axis=-1), axis=-1)
    inner_B = jnp.argmax(jnp.take_along_axis(x_BNC, block_B[:, None, None], axis=1)[:, 0], axis=-1)
    return (block_B * ARGMAX_BLOCK + inner_B).astype(jnp.int32)


def sample_next(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    temperature_B: jax.Array,
    top_p_B: jax.Array,
    top_k_B: jax.Array,
    min_p_B: jax.Array,
) -> jax.Array:
    """Sample one token per row -> token_ids_B int32. temperature 0 is greedy."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = temperature_B <= 0
    scaled_BV = logits_BV / logprob_temperature(temperature_B)[:, None]

    needs_truncation = jnp.any(((top_k_B > 0) | (top_p_B < 1) | (min_p_B > 0)) & ~greedy_B)
    mask_BV = jax.lax.cond(
        needs_truncation,
        lambda: truncation_mask(scaled_BV, top_p_B, top_k_B, min_p_B),
        lambda: jnp.ones(scaled_BV.shape, bool),
    )
    vocab = logits_BV.shape[-1]

    def gumbel_max() -> jax.Array:
        gumbel_BV = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(keys_B)
        return argmax(jnp.where(mask_BV, scaled_BV + gumbel_BV, -jnp.inf))

    # An all-greedy batch skips drawing B x V Gumbel noise.
    sampled_B = jax.lax.cond(jnp.all(greedy_B), lambda: jnp.zeros(greedy_B.shape, jnp.int32), gumbel_max)
    return jnp.where(greedy_B, argmax(logits_BV), sampled_B)


def sampled_logprobs(
    hidden_ND: jax.Array, w_DV: jax.Array, tokens_N: jax.Array, temperature_N: jax.Array
) -> jax.Array:
    """log softmax(h·W / τ)[token] per row (fp32), τ = 0 (greedy) counting as 1.

    fused_logprob takes one static temperature, so each row's own τ scales its hidden state: (h/τ)·W = h·W/τ.
    """
    inverse_N = 1.0 / logprob_temperature(temperature_N)
    return fused_logprob(hidden_ND.astype(jnp.float32) * inverse_N[:, None], w_DV, tokens_N)
