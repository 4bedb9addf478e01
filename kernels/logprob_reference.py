"""Plain-JAX log-prob paths: `naive_logprob` (full [T, V] logits, for parity and benchmarks) and the chunked
reference (a scan over vocabulary chunks with an online log-sum-exp), which is the default on CPU.

The chunked functions work on one vocabulary shard: `targets_T` are already relative to the shard's first
column, so a target outside [0, V) simply contributes nothing. Gradients are recomputed chunk by chunk, so
neither pass keeps more than one [T, chunk] tile alive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from orchestra_jax.kernels import logprob_math as lm

# A chunk of logits holds about 2^24 fp32 values (64 MiB): big enough for efficient matmuls, small enough
# that the handful of chunk-sized temporaries stay far below one [T, V] array.
CHUNK_ELEMENTS = 1 << 24


def default_chunk(rows: int) -> int:
    """Vocabulary chunk width for `rows` tokens: a multiple of 128 in [512, 8192]."""
    return max(512, min(8192, CHUNK_ELEMENTS // max(rows, 1) // 128 * 128))


def naive_logprob(
    hidden_TH: jnp.ndarray,
    w_HV: jnp.ndarray,
    targets_T: jnp.ndarray,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log_softmax(h·W / τ)[target] over materialised fp32 logits: the unfused baseline."""
    logits_TV = jnp.dot(hidden_TH, w_HV, preferred_element_type=jnp.float32) / temperature
    logp_TV = jax.nn.log_softmax(logits_TV, axis=-1)
    logprob_T = jnp.take_along_axis(logp_TV, targets_T[:, None].astype(jnp.int32), axis=1)[:, 0]
    if not return_entropy:
        return logprob_T
    return logprob_T, -jnp.sum(jnp.exp(logp_TV) * logp_TV, axis=-1)


def _chunk_geometry(num_cols: int, chunk: int) -> tuple[int, int]:
    size = min(chunk, num_cols)
    return size, -(-num_cols // size)


def _chunk(w_HV: jnp.ndarray, i: jnp.ndarray, size: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Chunk i of the columns, their indices and its first column. The last chunk is shifted left to stay in bounds; the
    columns it shares with chunk i−1 get the sentinel index V (treated as padding), so none counts twice."""
    num_cols = w_HV.shape[1]
    start = jnp.minimum(i * size, num_cols - size)
    w_HC = jax.lax.dynamic_slice_in_dim(w_HV, start, size, axis=1)
    cols_C = start + jnp.arange(size)
    return w_HC, jnp.where(cols_C >= i * size, cols_C, num_cols), start


def _scaled_logits(hidden_TH, w_HC, temperature):
    return jnp.dot(hidden_TH, w_HC, preferred_element_type=jnp.float32) * (1.0 / temperature)


def reference_stats(
    hidden_TH: jnp.ndarray,
    w_HV: jnp.ndarray,
    targets_T: jnp.ndarray,
    *,
    temperature: float,
    chunk: int | None = None,
) -> tuple[jnp.ndarray, ...]:
    """The (m, s, u, tz) summary of each row of h·W / τ over this shard's columns (see logprob_math)."""
    num_cols = w_HV.shape[1]
    size, count = _chunk_geometry(num_cols, chunk or default_chunk(hidden_TH.shape[0]))
    targets_T = targets_T.astype(jnp.int32)

    def body(stats, i):
        w_HC, cols_C, _ = _chunk(w_HV, i, size)
        z_TC = _scaled_logits(hidden_TH, w_HC, temperature)
        return lm.merge_stats(stats, lm.tile_stats(z_TC, cols_C, targets_T, num_cols)), None

    stats, _ = jax.lax.scan(body, lm.empty_stats(hidden_TH.shape[0]), jnp.arange(count))
    return stats


def reference_grads(
    hidden_TH: jnp.ndarray,
    w_HV: jnp.ndarray,
    targets_T: jnp.ndarray,
    lse_T: jnp.ndarray,
    mean_z_T: jnp.ndarray,
    g_logprob_T: jnp.ndarray,
    g_entropy_T: jnp.ndarray,
    *,
    temperature: float,
    chunk: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(∂L/∂h, ∂L/∂W) for this shard's columns, recomputing each logit chunk; fp32 accumulation."""
    num_cols = w_HV.shape[1]
    size, count = _chunk_geometry(num_cols, chunk or default_chunk(hidden_TH.shape[0]))
    targets_T = targets_T.astype(jnp.int32)
    compute = hidden_TH.dtype

    def body(carry, i):
        dh_TH, dw_HV = carry
        w_HC, cols_C, start = _chunk(w_HV, i, size)
        z_TC = _scaled_logits(hidden_TH, w_HC, temperature)
        dz_TC = lm.tile_logit_grad(
            z_TC, cols_C, targets_T, num_cols, lse_T, mean_z_T, g_logprob_T, g_entropy_T
        )
        dz_TC = (dz_TC * (1.0 / temperature)).astype(compute)
        dh_TH = dh_TH + jnp.dot(dz_TC, w_HC.T, preferred_element_type=jnp.float32)
        dw_HC = jnp.dot(hidden_TH.T, dz_TC, preferred_element_type=jnp.float32)
        # Overlapping columns of the shifted last chunk have dz = 0, so adding (not overwriting) is exact.
        old_HC = jax.lax.dynamic_slice_in_dim(dw_HV, start, size, axis=1)
        dw_HV = jax.lax.dynamic_update_slice_in_dim(dw_HV, old_HC + dw_HC, start, axis=1)
        return (dh_TH, dw_HV), None

    init = (jnp.zeros(hidden_TH.shape, jnp.float32), jnp.zeros(w_HV.shape, jnp.float32))
    (dh_TH, dw_HV), _ = jax.lax.scan(body, init, jnp.arange(count))
    return dh_TH.astype(hidden_TH.dtype), dw_HV.astype(w_HV.dtype)
