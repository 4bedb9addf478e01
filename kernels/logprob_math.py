"""The tile maths shared by every log-prob path (plain-JAX scan, Pallas kernel, vocab-sharded combine).

A row of scaled logits z = h·W / τ is summarised by four running numbers, so no path ever holds a whole
[T, V] block:
  m  = max_j z_j                    (running max)
  s  = Σ_j exp(z_j − m)             (sum-exp relative to m)
  u  = Σ_j exp(z_j − m)·(z_j − m)   (first moment relative to m; entropy without cancellation)
  tz = z_target                     (0 where the target lies outside the columns seen)
Then lse = m + log s, log p(target) = tz − lse, entropy = log s − u / s, and the mean logit under p is
E = m + u / s. Merging two summaries rescales each to the larger max (flash-attention style).

Gradients (per row, with upstream cotangents g for log-prob and g_H for entropy):
  ∂ log p(target) / ∂z_j = 1[j = target] − p_j
  ∂ entropy / ∂z_j       = −p_j (z_j − E)
and ∂z/∂h, ∂z/∂W carry the factor 1/τ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def empty_stats(rows: int) -> tuple[jnp.ndarray, ...]:
    """The summary of no columns at all (m = −inf, everything else 0)."""
    return (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def merge_stats(a: tuple[jnp.ndarray, ...], b: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
    """Combine the summaries of two disjoint column sets; either may be empty (m = −inf, s = 0)."""
    m_a, s_a, u_a, tz_a = a
    m_b, s_b, u_b, tz_b = b
    m = jnp.maximum(m_a, m_b)
    s_a, u_a = rescale(m, m_a, s_a, u_a)
    s_b, u_b = rescale(m, m_b, s_b, u_b)
    return m, s_a + s_b, u_a + u_b, tz_a + tz_b


def rescale(
    m_new: jnp.ndarray, m: jnp.ndarray, s: jnp.ndarray, u: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(s, u) re-expressed relative to a larger max m_new."""
    # An empty part has m = −inf and s = 0: its shift (m − m_new)·s would be nan, so guard it.
    alpha = jnp.where(s > 0, jnp.exp(m - m_new), 0.0)
    shift = jnp.where(s > 0, (m - m_new) * s, 0.0)
    return alpha * s, alpha * (u + shift)


def tile_stats(
    z_RC: jnp.ndarray,
    cols_C: jnp.ndarray,
    targets_R: jnp.ndarray | None,
    num_cols: int | None,
    *,
    with_entropy: bool = True,
    separate_reductions: bool = False,
) -> tuple[jnp.ndarray, ...]:
    """Summary of one fp32 tile of scaled logits.

    Columns with index >= num_cols are padding and ignored; num_cols=None promises a tile without padding, so
    the masks (a select on every element) are left out of the program. with_entropy=False leaves u = 0.
    targets_R=None leaves tz = 0, for callers that take it from `target_logits` instead.
    separate_reductions: s and u each recompute exp(z − m) behind an optimisation barrier. XLA's CPU compiler
    otherwise writes z − m and the exp out as whole tiles for the two sums to share: 11.2 ms against 2.5 ms on
    a [2048, 2048] tile (a /tmp probe). The plain-JAX path asks for it; a Pallas tile lives in registers anyway.
    """
    hit_RC = None if targets_R is None else cols_C[None, :] == targets_R[:, None]
    valid_RC = None if num_cols is None else jnp.broadcast_to(cols_C[None, :] < num_cols, z_RC.shape)
    if valid_RC is None:
        m_R = jnp.max(z_RC, axis=1)
    else:
        m_R = jnp.max(jnp.where(valid_RC, z_RC, -jnp.inf), axis=1)
        hit_RC = None if hit_RC is None else hit_RC & valid_RC

    def shifted(z_RC, m_R):
        """(z − m, exp(z − m)), both 0 in padding columns."""
        if valid_RC is None:
            d_RC = z_RC - m_R[:, None]
            return d_RC, jnp.exp(d_RC)
        d_RC = jnp.where(valid_RC, z_RC - m_R[:, None], 0.0)
        return d_RC, jnp.where(valid_RC, jnp.exp(d_RC), 0.0)

    d_RC, e_RC = shifted(z_RC, m_R)
    s_R = jnp.sum(e_RC, axis=1)
    if with_entropy and separate_reductions:
        d_RC, e_RC = shifted(*jax.lax.optimization_barrier((z_RC, m_R)))
    u_R = jnp.sum(e_RC * d_RC, axis=1) if with_entropy else jnp.zeros_like(s_R)
    tz_R = jnp.zeros_like(s_R) if hit_RC is None else jnp.sum(jnp.where(hit_RC, z_RC, 0.0), axis=1)
    return m_R, s_R, u_R, tz_R


def target_logits(
    hidden_TH: jnp.ndarray, w_HV: jnp.ndarray, targets_T: jnp.ndarray, temperature: float
) -> jnp.ndarray:
    """tz = h_t · W[:, target_t] / τ (0 where the target lies outside W's columns), from a gather of T columns.

    Inside a GPU tile the per-tile hit mask of `tile_stats` is free; under XLA on CPU it becomes one more
    [T, chunk] array written and read per chunk, which this row-wise dot avoids.
    """
    num_cols = w_HV.shape[1]
    inside_T = (targets_T >= 0) & (targets_T < num_cols)
    # In the hidden states' dtype, as the chunked logits read W (a wider head is cast as it is read).
    w_HT = jnp.take(w_HV, jnp.clip(targets_T, 0, num_cols - 1), axis=1).astype(hidden_TH.dtype)
    tz_T = jnp.einsum("th,ht->t", hidden_TH, w_HT, preferred_element_type=jnp.float32) * (1.0 / temperature)
    return jnp.where(inside_T, tz_T, 0.0)


def finish_stats(stats: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
    """(logprob, entropy, lse, mean_z) from a complete summary. log-prob is clamped to <= 0."""
    m, s, u, tz = stats
    log_s = jnp.log(s)
    lse = m + log_s
    mean_shift = u / s
    # tz <= m <= lse mathematically; rounding may leave +1 ulp, and a positive log-prob is never right.
    logprob = jnp.minimum(tz - lse, 0.0)
    entropy = jnp.maximum(log_s - mean_shift, 0.0)
    return logprob, entropy, lse, m + mean_shift


def tile_logit_grad(
    z_RC: jnp.ndarray,
    cols_C: jnp.ndarray,
    targets_R: jnp.ndarray,
    num_cols: int | None,
    lse_R: jnp.ndarray,
    mean_z_R: jnp.ndarray | None,
    g_logprob_R: jnp.ndarray,
    g_entropy_R: jnp.ndarray | None,
) -> jnp.ndarray:
    """∂L/∂z for one tile (fp32, zero in padding columns); multiply by 1/τ for ∂L/∂(h·W).

    num_cols=None: the tile has no padding (no masks). mean_z_R = g_entropy_R = None: no entropy term.
    """
    p_RC = jnp.exp(z_RC - lse_R[:, None])
    hit_RC = cols_C[None, :] == targets_R[:, None]
    if num_cols is not None:
        valid_RC = cols_C[None, :] < num_cols
        p_RC = jnp.where(valid_RC, p_RC, 0.0)
        hit_RC = hit_RC & valid_RC
    dz_RC = jnp.where(hit_RC, g_logprob_R[:, None], 0.0) - g_logprob_R[:, None] * p_RC
    if g_entropy_R is None:
        return dz_RC
    # Padding columns hold finite logits and p = 0 there, so the entropy term needs no mask of its own.
    return dz_RC - g_entropy_R[:, None] * p_RC * (z_RC - mean_z_R[:, None])
