"""Plain-JAX log-prob paths: `naive_logprob` (full [T, V] logits, for parity and benchmarks) and the chunked
reference (a scan over vocabulary chunks with an online log-sum-exp), which is the default on CPU.

The chunked functions work on one vocabulary shard: `targets_T` are already relative to the shard's first
column, so a target outside [0, V) simply contributes nothing. They read W as row chunks of its [V, H]
transpose, the tied embedding's own layout (XLA cancels the two transposes), so no pass copies a tied head.
The backward recomputes the logits chunk by chunk, unless the forward kept them (`keeps_logits`: only while
all T·V of them fit in KEEP_LOGITS_ELEMENTS), so above that neither pass holds more than one [T, chunk] tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from orchestra_jax.kernels import logprob_math as lm

# On the CPU a chunk of logits holds about 2^24 fp32 values (64 MiB): big enough for efficient matmuls, small
# enough that the handful of chunk-sized temporaries stay far below one [T, V] array.
CHUNK_ELEMENTS = 1 << 24
# Elsewhere (a GPU) 2^27 (512 MiB), in widths that are multiples of 128: on an H200 the Qwen3-0.6B step's head
# ran the backward matmuls of its 128 chunks of V / 128 = 1187 columns at about 170 TFLOP/s, and the whole step
# took 0.31 s against 0.26 s with 16 chunks of 9496 (notes/DEVICE_NOTES.md, session 13).
ACCELERATOR_CHUNK_ELEMENTS = 1 << 27
# Up to this many logits (512 MiB of fp32) the forward keeps them for the backward, which then skips a matmul:
# SmolLM2-135M's head at 4 x 128 tokens (fwd+bwd, bf16, CPU) took 342 ms against 403 ms recomputing them with
# the earlier column-chunk layout (a /tmp probe; notes/BENCHMARKS.md, session 12).
KEEP_LOGITS_ELEMENTS = 1 << 27


def default_chunk(rows: int) -> int:
    """Vocabulary chunk width for `rows` tokens: a multiple of 128 in [512, 8192]."""
    elements = CHUNK_ELEMENTS if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(512, min(8192, elements // max(rows, 1) // 128 * 128))


def keeps_logits(rows: int, num_cols: int) -> bool:
    return rows * num_cols <= KEEP_LOGITS_ELEMENTS


def chunk_plan(rows: int, num_cols: int, chunk: int | None = None) -> tuple[int, int, bool]:
    """(chunk width, chunk count, exact) for a scan over num_cols columns.

    Without an explicit chunk, on the CPU a divisor of num_cols within 2x of default_chunk(rows) is preferred
    (the one nearest in ratio): then the chunks tile the columns exactly and the padding masks are dropped
    statically. Qwen3's V = 151936 = 2^7 · 1187 has no multiple-of-128 divisor near 2048, but 2374 = V / 64
    divides it. A GPU keeps default_chunk's multiple of 128, whose rows stay aligned for its matmuls.
    """
    if chunk is None:
        chunk = target = default_chunk(rows)
        if jax.default_backend() == "cpu":
            divisors = [d for d in range(max(1, target // 2), 2 * target + 1) if num_cols % d == 0]
            chunk = min(divisors, key=lambda d: max(d / target, target / d), default=target)
    size = min(chunk, num_cols)
    count = -(-num_cols // size)
    return size, count, count * size == num_cols


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


def _chunk(w_VH: jnp.ndarray, i: jnp.ndarray, size: int, exact: bool, dtype):
    """Chunk i of W's columns as rows of w_VH (in `dtype`), their indices, its first column, and num_cols for
    the tile maths (None: exact).

    When the chunks do not tile the columns, the last one is shifted left to stay in bounds; the columns it
    shares with chunk i−1 get the sentinel index V (treated as padding), so none counts twice."""
    num_cols = w_VH.shape[0]
    start = i * size if exact else jnp.minimum(i * size, num_cols - size)
    w_CH = _rows(w_VH, start, size, dtype)
    cols_C = start + jnp.arange(size)
    if exact:
        return w_CH, cols_C, start, None
    return w_CH, jnp.where(cols_C >= i * size, cols_C, num_cols), start, num_cols


def _rows(w_VH: jnp.ndarray, start: jnp.ndarray, size: int, dtype) -> jnp.ndarray:
    """w[start:start + size], cast to `dtype`.

    A wider w (an f32 head for bf16 hidden states) is cast chunk by chunk as it is read: a bf16 copy made by
    the caller, shared by the forward and the backward, cost XLA's CPU compiler two more copies of the head.
    A 16-bit float w is sliced as its uint16 bits: XLA's CPU compiler upcasts a bf16 dynamic slice to f32
    and hoists a float32 copy of the whole of w out of the loop; the bits cost one copy of w's own size."""
    if w_VH.dtype.itemsize != 2:
        return jax.lax.dynamic_slice_in_dim(w_VH, start, size).astype(dtype)
    rows_CH = jax.lax.dynamic_slice_in_dim(jax.lax.bitcast_convert_type(w_VH, jnp.uint16), start, size)
    return jax.lax.bitcast_convert_type(rows_CH, w_VH.dtype).astype(dtype)


def _scaled(x, temperature):
    # τ = 1 is static: skip a pass over the tile.
    return x if temperature == 1.0 else x * (1.0 / temperature)


def _chunk_logits(hidden_TH: jnp.ndarray, w_CH: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """Scaled fp32 logits of one chunk: w_CH's rows contracted on their last axis, which XLA's CPU (YNNPACK)
    runs natively in bf16, so the tied embedding is read in its own layout."""
    return _scaled(jnp.einsum("th,ch->tc", hidden_TH, w_CH, preferred_element_type=jnp.float32), temperature)


def reference_stats(
    hidden_TH: jnp.ndarray,
    w_HV: jnp.ndarray,
    targets_T: jnp.ndarray,
    *,
    temperature: float,
    chunk: int | None = None,
    with_entropy: bool = True,
    keep_logits: bool = False,
) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray | None]:
    """The (m, s, u, tz) summary of each row of h·W / τ over this shard's columns (see logprob_math), and with
    keep_logits the scaled fp32 logit chunks [chunks, T, chunk] for `reference_grads` (else None).

    with_entropy=False leaves u = 0 (entropy and mean_z from finish_stats are then meaningless)."""
    size, count, exact = chunk_plan(hidden_TH.shape[0], w_HV.shape[1], chunk)
    w_VH = w_HV.T

    def body(stats, i):
        w_CH, cols_C, _, num_cols = _chunk(w_VH, i, size, exact, hidden_TH.dtype)
        z_TC = _chunk_logits(hidden_TH, w_CH, temperature)
        tile = lm.tile_stats(z_TC, cols_C, None, num_cols, with_entropy=with_entropy,
                             separate_reductions=True)
        return lm.merge_stats(stats, tile), (z_TC if keep_logits else None)

    (m_T, s_T, u_T, _), logits_NTC = jax.lax.scan(body, lm.empty_stats(hidden_TH.shape[0]), jnp.arange(count))
    tz_T = lm.target_logits(hidden_TH, w_HV, targets_T.astype(jnp.int32), temperature)
    return (m_T, s_T, u_T, tz_T), logits_NTC


def reference_grads(
    hidden_TH: jnp.ndarray,
    w_HV: jnp.ndarray,
    targets_T: jnp.ndarray,
    lse_T: jnp.ndarray,
    mean_z_T: jnp.ndarray | None,
    g_logprob_T: jnp.ndarray,
    g_entropy_T: jnp.ndarray | None,
    *,
    temperature: float,
    chunk: int | None = None,
    logits_NTC: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(∂L/∂h, ∂L/∂W) for this shard's columns, from the logit chunks `reference_stats` kept, or recomputing
    each one (logits_NTC=None); fp32 accumulation.

    mean_z_T = g_entropy_T = None: the loss has no entropy term, and its per-element work is skipped."""
    size, count, exact = chunk_plan(hidden_TH.shape[0], w_HV.shape[1], chunk)
    targets_T = targets_T.astype(jnp.int32)
    compute = hidden_TH.dtype
    w_VH = w_HV.T
    # XLA's CPU runs a bf16 matmul natively unless its left operand is contracted over its first dimension
    # (then about half as fast, in f32): ∂W = hᵀ·∂z reads hᵀ from a transposed copy made once, behind an
    # optimisation barrier so that XLA does not fold the transpose back into the dot.
    native = compute == jnp.bfloat16 and jax.default_backend() == "cpu"
    hidden_HT = jax.lax.optimization_barrier(hidden_TH.T) if native else hidden_TH.T

    def body(carry, i):
        dh_TH, dw_HV = carry
        w_CH, cols_C, start, num_cols = _chunk(w_VH, i, size, exact, compute)
        z_TC = _chunk_logits(hidden_TH, w_CH, temperature) if logits_NTC is None else logits_NTC[i]
        dz_TC = lm.tile_logit_grad(
            z_TC, cols_C, targets_T, num_cols, lse_T, mean_z_T, g_logprob_T, g_entropy_T
        )
        dz_TC = _scaled(dz_TC, temperature).astype(compute)
        dh_TH = dh_TH + jnp.dot(dz_TC, w_CH, preferred_element_type=jnp.float32)
        dw_HC = jnp.dot(hidden_HT, dz_TC, preferred_element_type=jnp.float32)
        if not exact:
            # Overlapping columns of the shifted last chunk have dz = 0, so adding (not overwriting) is exact.
            dw_HC = dw_HC + jax.lax.dynamic_slice_in_dim(dw_HV, start, size, axis=1)
        dw_HV = jax.lax.dynamic_update_slice_in_dim(dw_HV, dw_HC, start, axis=1)
        return (dh_TH, dw_HV), None

    init = (jnp.zeros(hidden_TH.shape, jnp.float32), jnp.zeros(w_HV.shape, jnp.float32))
    (dh_TH, dw_HV), _ = jax.lax.scan(body, init, jnp.arange(count))
    if native:  # nor may a transpose that follows (a tied embedding's) fold into a one-chunk loop's ∂W dot
        dw_HV = jax.lax.optimization_barrier(dw_HV)
    return dh_TH.astype(hidden_TH.dtype), dw_HV.astype(w_HV.dtype)
