"""Advantage estimators as Pallas kernels with plain-JAX references: GAE and group-relative z-scores.

GAE (Schulman et al. 2016) runs a reverse recursion over time, one row per sequence:
  δ_t = r_t + γ·V_next − V_t,  A_t = δ_t + γλ·A_next,  returns_t = A_t + V_t
where "next" is the next position whose mask is on: masked positions (tool responses, padding) are skipped,
neither breaking nor feeding the recursion, and get advantage 0 and return 0. The value after the last
unmasked token is 0 (episodes end at the sequence end).

Group advantages (GRPO; ToolOrchestra §3): A_i = (R_i − mean_g R) / (std_g R + ε) over the rollouts i of
group g (population std by default, sample std with unbiased=True), then optionally clipped to ±clip. A group
whose rewards are all equal gets 0 exactly (not rounding noise over ε), as does a singleton group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from orchestra_jax.kernels import dispatch, pallas_call


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------------- GAE


def gae_reference(rewards_BT, values_BT, mask_BT, *, gamma: float, lam: float):
    """Plain-JAX GAE: a reverse lax.scan over time, all rows at once."""

    def step(carry, x):
        next_value_B, next_adv_B = carry
        r_B, v_B, on_B = x
        adv_B = r_B + gamma * next_value_B - v_B + gamma * lam * next_adv_B
        carry = (jnp.where(on_B, v_B, next_value_B), jnp.where(on_B, adv_B, next_adv_B))
        return carry, (jnp.where(on_B, adv_B, 0.0), jnp.where(on_B, adv_B + v_B, 0.0))

    rows = rewards_BT.shape[0]
    zeros_B = jnp.zeros((rows,), jnp.float32)
    xs = (rewards_BT.T, values_BT.T, mask_BT.T > 0)
    _, (adv_TB, ret_TB) = jax.lax.scan(step, (zeros_B, zeros_B), xs, reverse=True)
    return adv_TB.T, ret_TB.T


def _gae_kernel(r_ref, v_ref, m_ref, adv_ref, ret_ref, *, gamma, lam, steps):
    rows = r_ref.shape[1]

    def body(i, carry):
        next_value, next_adv = carry
        t = steps - 1 - i
        r, v, on = r_ref[t, :], v_ref[t, :], m_ref[t, :] > 0
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        adv_ref[t, :] = jnp.where(on, adv, 0.0)
        ret_ref[t, :] = jnp.where(on, adv + v, 0.0)
        return jnp.where(on, v, next_value), jnp.where(on, adv, next_adv)

    zeros = jnp.zeros((rows,), jnp.float32)
    jax.lax.fori_loop(0, steps, body, (zeros, zeros))


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "interpret", "poison", "block_rows"))
def gae_pallas(rewards_BT, values_BT, mask_BT, *, gamma, lam, interpret=False, poison=False, block_rows=32):
    """Pallas GAE: a grid over blocks of rows; each program walks time backwards (time-major layout)."""
    rows, steps = rewards_BT.shape
    padded = _round_up(rows, block_rows)

    def time_major(x):
        return jnp.pad(x.astype(jnp.float32).T, ((0, 0), (0, padded - rows)))

    spec = pl.BlockSpec((steps, block_rows), lambda i: (0, i))
    out = jax.ShapeDtypeStruct((steps, padded), jnp.float32)
    adv_TB, ret_TB = pallas_call.call(
        functools.partial(_gae_kernel, gamma=gamma, lam=lam, steps=steps),
        grid=(padded // block_rows,),
        in_specs=(spec, spec, spec),
        out_specs=(spec, spec),
        out_shape=(out, out),
        args=(time_major(rewards_BT), time_major(values_BT), time_major(mask_BT)),
        interpret=interpret,
        poison=poison,
    )
    return adv_TB[:, :rows].T, ret_TB[:, :rows].T


def gae(rewards_BT, values_BT, mask_BT, *, gamma: float, lam: float, impl: str = "auto"):
    """(advantages_BT, returns_BT) in fp32; see the module docstring for the mask semantics."""
    rewards_BT, values_BT, mask_BT = (jnp.asarray(x) for x in (rewards_BT, values_BT, mask_BT))
    if rewards_BT.ndim != 2 or rewards_BT.shape != values_BT.shape or rewards_BT.shape != mask_BT.shape:
        raise ValueError(
            f"gae: rewards, values and mask must share one [B, T] shape; got "
            f"{rewards_BT.shape}, {values_BT.shape}, {mask_BT.shape}"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must lie in [0, 1]; got gamma={gamma}, lam={lam}")
    kind = dispatch.resolve_impl(impl)
    rewards_BT, values_BT = rewards_BT.astype(jnp.float32), values_BT.astype(jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    if kind == "reference":
        return gae_reference(rewards_BT, values_BT, mask_BT, gamma=float(gamma), lam=float(lam))
    return gae_pallas(
        rewards_BT, values_BT, mask_BT, gamma=float(gamma), lam=float(lam), interpret=kind == "interpret"
    )


# ---------------------------------------------------------------------------------------- group advantages


def _normalise(r_N, mean_N, var_N, spread_N, eps, clip):
    # `spread == 0`, not `spread > 0`: a NaN reward then gives its group NaN, not a silent 0 (the train step's
    # non-finite guard sees it).
    adv_N = jnp.where(spread_N == 0, 0.0, (r_N - mean_N) / (jnp.sqrt(var_N) + eps))
    return adv_N if clip is None else jnp.clip(adv_N, -clip, clip)


def _variance(sum_sq_N, count_N, unbiased):
    dof_N = count_N - 1.0 if unbiased else count_N
    return jnp.where(dof_N > 0, sum_sq_N / jnp.maximum(dof_N, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("eps", "unbiased", "clip"))
def group_advantages_reference(rewards_N, group_ids_N, *, eps, unbiased, clip):
    """Plain-JAX group z-scores through dense segment ids (jnp.unique) and segment reductions."""
    n = rewards_N.shape[0]
    _, dense_N = jnp.unique(group_ids_N, size=n, return_inverse=True)
    dense_N = dense_N.reshape(n)
    seg = functools.partial(jax.ops.segment_sum, segment_ids=dense_N, num_segments=n)
    count_N = seg(jnp.ones_like(rewards_N))[dense_N]
    mean_N = seg(rewards_N)[dense_N] / count_N
    var_N = _variance(seg((rewards_N - mean_N) ** 2)[dense_N], count_N, unbiased)
    high_N = jax.ops.segment_max(rewards_N, dense_N, num_segments=n)[dense_N]
    low_N = jax.ops.segment_min(rewards_N, dense_N, num_segments=n)[dense_N]
    return _normalise(rewards_N, mean_N, var_N, high_N - low_N, eps, clip)


def _group_kernel(r_ref, g_ref, valid_ref, adv_ref, *, block, num_blocks, eps, unbiased, clip):
    row0 = pl.multiple_of(pl.program_id(0) * block, block)
    r_i, g_i = r_ref[pl.ds(row0, block)], g_ref[pl.ds(row0, block)]

    def same_group(j):
        cols = pl.ds(pl.multiple_of(j * block, block), block)
        same = (g_i[:, None] == g_ref[cols][None, :]) & (valid_ref[cols][None, :] > 0)
        return same, r_ref[cols][None, :]

    def first_pass(j, carry):
        count, total, high, low = carry
        same, r_j = same_group(j)
        return (
            count + jnp.sum(same.astype(jnp.float32), axis=1),
            total + jnp.sum(jnp.where(same, r_j, 0.0), axis=1),
            jnp.maximum(high, jnp.max(jnp.where(same, r_j, -jnp.inf), axis=1)),
            jnp.minimum(low, jnp.min(jnp.where(same, r_j, jnp.inf), axis=1)),
        )

    zeros = jnp.zeros((block,), jnp.float32)
    init = (zeros, zeros, jnp.full((block,), -jnp.inf), jnp.full((block,), jnp.inf))
    count, total, high, low = jax.lax.fori_loop(0, num_blocks, first_pass, init)
    mean = total / jnp.maximum(count, 1.0)

    def second_pass(j, sum_sq):
        same, r_j = same_group(j)
        return sum_sq + jnp.sum(jnp.where(same, (r_j - mean[:, None]) ** 2, 0.0), axis=1)

    sum_sq = jax.lax.fori_loop(0, num_blocks, second_pass, zeros)
    spread = jnp.where(count > 0, high - low, 0.0)
    adv_ref[...] = _normalise(r_i, mean, _variance(sum_sq, count, unbiased), spread, eps, clip)


@functools.partial(jax.jit, static_argnames=("eps", "unbiased", "clip", "interpret", "poison", "block"))
def group_advantages_pallas(
    rewards_N, group_ids_N, *, eps, unbiased, clip, interpret=False, poison=False, block=128
):
    """Pallas group z-scores: each program takes a block of rollouts and scans all others for its group
    (O(N²) compares, which is nothing next to a policy step for the N ≤ a few thousand rollouts of a step)."""
    n = rewards_N.shape[0]
    padded = _round_up(n, block)
    r_N = jnp.pad(rewards_N, (0, padded - n))
    g_N = jnp.pad(group_ids_N, (0, padded - n))
    valid_N = jnp.pad(jnp.ones((n,), jnp.float32), (0, padded - n))
    whole = pl.BlockSpec((padded,), lambda i: (0,))
    (adv_N,) = pallas_call.call(
        functools.partial(
            _group_kernel, block=block, num_blocks=padded // block, eps=eps, unbiased=unbiased, clip=clip
        ),
        grid=(padded // block,),
        in_specs=(whole, whole, whole),
        out_specs=(pl.BlockSpec((block,), lambda i: (i,)),),
        out_shape=(jax.ShapeDtypeStruct((padded,), jnp.float32),),
        args=(r_N, g_N, valid_N),
        interpret=interpret,
        poison=poison,
    )
    return adv_N[:n]


def group_advantages(
    rewards_N,
    group_ids_N,
    *,
    eps: float = 1e-6,
    unbiased: bool = False,
    clip: float | None = None,
    impl: str = "auto",
):
    """Per-rollout advantage: z-score of its reward within its group id (fp32); see the module docstring."""
    rewards_N, group_ids_N = jnp.asarray(rewards_N), jnp.asarray(group_ids_N)
    if rewards_N.ndim != 1 or rewards_N.shape != group_ids_N.shape:
        raise ValueError(
            f"group_advantages: rewards and group_ids must be one [N] shape; got {rewards_N.shape}, "
            f"{group_ids_N.shape}"
        )
    if not jnp.issubdtype(group_ids_N.dtype, jnp.integer):
        raise ValueError(f"group_advantages: group_ids must be integers, got {group_ids_N.dtype}")
    if clip is not None and not clip > 0:
        raise ValueError(f"group_advantages: clip must be > 0 or None, got {clip}")
    kind = dispatch.resolve_impl(impl)
    rewards_N, group_ids_N = rewards_N.astype(jnp.float32), group_ids_N.astype(jnp.int32)
    options = dict(eps=float(eps), unbiased=bool(unbiased), clip=None if clip is None else float(clip))
    if kind == "reference":
        return group_advantages_reference(rewards_N, group_ids_N, **options)
    return group_advantages_pallas(rewards_N, group_ids_N, interpret=kind == "interpret", **options)
