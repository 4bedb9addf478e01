"""Pallas kernels for the fused LM-head log-prob: forward summary, ∂h and ∂W, tiled over tokens, vocabulary
and hidden size, so no [T, V] block ever exists in memory.

Written in the GPU (Triton) style: a 1-D grid of programs, each looping over the other axes with
`fori_loop` and loading power-of-two tiles with `pl.ds`; every program owns the rows (or columns) it writes,
so no atomics are needed. Three kernels:
  stats  grid over token blocks: online (m, s, u, tz) across vocab tiles (see logprob_math);
  dh     grid over token blocks: recompute each logit tile, ∂z, accumulate ∂z·Wᵀ into its rows of ∂h;
  dw     grid over vocab blocks: recompute each logit tile, ∂z, accumulate hᵀ·∂z into its columns of ∂W.
The backward recomputes the logits twice (once per kernel): 5 matmul-equivalents in all, against 3 for the
unfused path, in exchange for O(T + V) extra memory instead of O(T·V).
Shapes are padded to whole tiles here (zero rows/columns; padded vocab columns are masked in the maths).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from orchestra_jax.kernels import logprob_math as lm
from orchestra_jax.kernels import pallas_call


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _hidden_block(hidden: int, block_k: int) -> int:
    """The largest power-of-two tile <= block_k that divides H (H is padded if none >= 16 does)."""
    k = block_k
    while k >= 16:
        if hidden % k == 0:
            return k
        k //= 2
    return block_k


def _pad_to(x: jnp.ndarray, shape: tuple[int, ...], value=0) -> jnp.ndarray:
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, n - d) for d, n in zip(x.shape, shape)], constant_values=value)


def _logit_tile(h_ref, w_ref, row0, col0, *, rows, cols, block_k, num_k, inv_temp):
    """(h[rows] · W[:, cols]) / τ in fp32, looping over the hidden dimension in block_k slices."""

    def body(k, acc):
        kk = pl.multiple_of(k * block_k, block_k)
        h = h_ref[pl.ds(row0, rows), pl.ds(kk, block_k)]
        w = w_ref[pl.ds(kk, block_k), pl.ds(col0, cols)]
        return acc + jnp.dot(h, w, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, num_k, body, jnp.zeros((rows, cols), jnp.float32)) * inv_temp


def _cols(col0, cols):
    return col0 + jax.lax.broadcasted_iota(jnp.int32, (cols,), 0)


def _stats_kernel(h_ref, w_ref, tgt_ref, m_ref, s_ref, u_ref, tz_ref, *, num_cols, block_v, num_v, tile):
    targets = tgt_ref[...]
    rows = targets.shape[0]

    def body(j, stats):
        col0 = pl.multiple_of(j * block_v, block_v)
        z = _logit_tile(h_ref, w_ref, 0, col0, rows=rows, cols=block_v, **tile)
        return lm.merge_stats(stats, lm.tile_stats(z, _cols(col0, block_v), targets, num_cols))

    m, s, u, tz = jax.lax.fori_loop(0, num_v, body, lm.empty_stats(rows))
    m_ref[...] = m
    s_ref[...] = s
    u_ref[...] = u
    tz_ref[...] = tz


def _dh_kernel(
    h_ref, w_ref, tgt_ref, lse_ref, mz_ref, glp_ref, gent_ref, dh_ref, *, num_cols, block_v, num_v, tile
):
    targets, lse, mean_z, g_lp, g_ent = tgt_ref[...], lse_ref[...], mz_ref[...], glp_ref[...], gent_ref[...]
    rows, block_k = targets.shape[0], tile["block_k"]

    def zero(k, _):
        dh_ref[:, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)] = jnp.zeros(
            (rows, block_k), jnp.float32
        )

    jax.lax.fori_loop(0, tile["num_k"], zero, None)

    def vocab_body(j, _):
        col0 = pl.multiple_of(j * block_v, block_v)
        z = _logit_tile(h_ref, w_ref, 0, col0, rows=rows, cols=block_v, **tile)
        dz = lm.tile_logit_grad(z, _cols(col0, block_v), targets, num_cols, lse, mean_z, g_lp, g_ent)
        dz = (dz * tile["inv_temp"]).astype(w_ref.dtype)

        def k_body(k, _):
            kk = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            w = w_ref[kk, pl.ds(col0, block_v)]
            contrib = jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            dh_ref[:, kk] = dh_ref[:, kk] + contrib

        jax.lax.fori_loop(0, tile["num_k"], k_body, None)

    jax.lax.fori_loop(0, num_v, vocab_body, None)


def _dw_kernel(
    h_ref,
    w_ref,
    tgt_ref,
    lse_ref,
    mz_ref,
    glp_ref,
    gent_ref,
    dw_ref,
    *,
    num_cols,
    block_v,
    block_t,
    num_t,
    tile,
):
    col0 = pl.multiple_of(pl.program_id(0) * block_v, block_v)
    cols = _cols(col0, block_v)
    block_k = tile["block_k"]

    def zero(k, _):
        dw_ref[pl.ds(pl.multiple_of(k * block_k, block_k), block_k), :] = jnp.zeros(
            (block_k, block_v), jnp.float32
        )

    jax.lax.fori_loop(0, tile["num_k"], zero, None)

    def token_body(i, _):
        row0 = pl.multiple_of(i * block_t, block_t)
        rs = pl.ds(row0, block_t)
        z = _logit_tile(h_ref, w_ref, row0, 0, rows=block_t, cols=block_v, **tile)  # w_ref is this block only
        dz = lm.tile_logit_grad(
            z, cols, tgt_ref[rs], num_cols, lse_ref[rs], mz_ref[rs], glp_ref[rs], gent_ref[rs]
        )
        dz = (dz * tile["inv_temp"]).astype(h_ref.dtype)

        def k_body(k, _):
            kk = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            h = h_ref[rs, kk]
            contrib = jax.lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            dw_ref[kk, :] = dw_ref[kk, :] + contrib

        jax.lax.fori_loop(0, tile["num_k"], k_body, None)

    jax.lax.fori_loop(0, num_t, token_body, None)


class _Layout:
    """Tile sizes and padded shapes for one call."""

    def __init__(self, hidden_TH, w_HV, block_t, block_v, block_k, temperature):
        t, h = hidden_TH.shape
        self.t, self.v = t, w_HV.shape[1]
        self.block_t, self.block_v = block_t, block_v
        block_k = _hidden_block(h, block_k)
        self.tp, self.hp, self.vp = _round_up(t, block_t), _round_up(h, block_k), _round_up(self.v, block_v)
        self.tile = dict(block_k=block_k, num_k=self.hp // block_k, inv_temp=1.0 / temperature)

    def pad(self, hidden_TH, w_HV, targets_T, *vectors_T):
        # Triton's dot wants one element type on both sides.
        dtype = jnp.promote_types(hidden_TH.dtype, w_HV.dtype)
        h = _pad_to(hidden_TH.astype(dtype), (self.tp, self.hp))
        w = _pad_to(w_HV.astype(dtype), (self.hp, self.vp))
        tgt = _pad_to(targets_T.astype(jnp.int32), (self.tp,), value=-1)
        return (h, w, tgt, *(_pad_to(x.astype(jnp.float32), (self.tp,)) for x in vectors_T))


@functools.partial(
    jax.jit, static_argnames=("temperature", "block_t", "block_v", "block_k", "interpret", "poison")
)
def pallas_stats(
    hidden_TH,
    w_HV,
    targets_T,
    *,
    temperature,
    block_t=64,
    block_v=128,
    block_k=64,
    interpret=False,
    poison=False,
):
    """The (m, s, u, tz) summary of each row over this shard's columns (what reference_stats returns first)."""
    lay = _Layout(hidden_TH, w_HV, block_t, block_v, block_k, temperature)
    h, w, tgt = lay.pad(hidden_TH, w_HV, targets_T)
    vec = pl.BlockSpec((block_t,), lambda i: (i,))
    kernel = functools.partial(
        _stats_kernel, num_cols=lay.v, block_v=block_v, num_v=lay.vp // block_v, tile=lay.tile
    )
    out = pallas_call.call(
        kernel,
        grid=(lay.tp // block_t,),
        in_specs=(
            pl.BlockSpec((block_t, lay.hp), lambda i: (i, 0)),
            pl.BlockSpec((lay.hp, lay.vp), lambda i: (0, 0)),
            vec,
        ),
        out_specs=(vec,) * 4,
        out_shape=(jax.ShapeDtypeStruct((lay.tp,), jnp.float32),) * 4,
        interpret=interpret,
        poison=poison,
        args=(h, w, tgt),
    )
    return tuple(x[: lay.t] for x in out)


@functools.partial(
    jax.jit, static_argnames=("temperature", "block_t", "block_v", "block_k", "interpret", "poison")
)
def pallas_grads(
    hidden_TH,
    w_HV,
    targets_T,
    lse_T,
    mean_z_T,
    g_logprob_T,
    g_entropy_T,
    *,
    temperature,
    block_t=64,
    block_v=128,
    block_k=64,
    interpret=False,
    poison=False,
):
    """(∂L/∂h, ∂L/∂W) for this shard's columns (same contract as reference_grads)."""
    lay = _Layout(hidden_TH, w_HV, block_t, block_v, block_k, temperature)
    args = lay.pad(hidden_TH, w_HV, targets_T, lse_T, mean_z_T, g_logprob_T, g_entropy_T)
    common = dict(num_cols=lay.v, block_v=block_v, tile=lay.tile)
    num_t, num_v = lay.tp // block_t, lay.vp // block_v

    vec = pl.BlockSpec((block_t,), lambda i: (i,))
    (dh,) = pallas_call.call(
        functools.partial(_dh_kernel, num_v=num_v, **common),
        grid=(num_t,),
        in_specs=(
            pl.BlockSpec((block_t, lay.hp), lambda i: (i, 0)),
            pl.BlockSpec((lay.hp, lay.vp), lambda i: (0, 0)),
        )
        + (vec,) * 5,
        out_specs=(pl.BlockSpec((block_t, lay.hp), lambda i: (i, 0)),),
        out_shape=(jax.ShapeDtypeStruct((lay.tp, lay.hp), jnp.float32),),
        interpret=interpret,
        poison=poison,
        args=args,
    )

    full_vec = pl.BlockSpec((lay.tp,), lambda j: (0,))
    (dw,) = pallas_call.call(
        functools.partial(_dw_kernel, block_t=block_t, num_t=num_t, **common),
        grid=(num_v,),
        in_specs=(
            pl.BlockSpec((lay.tp, lay.hp), lambda j: (0, 0)),
            pl.BlockSpec((lay.hp, block_v), lambda j: (0, j)),
        )
        + (full_vec,) * 5,
        out_specs=(pl.BlockSpec((lay.hp, block_v), lambda j: (0, j)),),
        out_shape=(jax.ShapeDtypeStruct((lay.hp, lay.vp), jnp.float32),),
        interpret=interpret,
        poison=poison,
        args=args,
    )
    t, h = hidden_TH.shape
    return dh[:t, :h].astype(hidden_TH.dtype), dw[:h, : lay.v].astype(w_HV.dtype)
