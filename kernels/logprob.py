"""Fused LM-head log-probs and entropies: log softmax(h·W / τ)[target] without materialising [T, V].

`fused_logprob` is the single-device entry point; `sharded_fused_logprob` splits the vocabulary over a mesh
axis (each shard summarises its columns, the summaries combine with pmax/psum) and the tokens over others.
Both are differentiable in hidden and W through a custom VJP whose backward recomputes logits tile by tile
(the single-device reference path keeps them instead while they fit in its KEEP_LOGITS_ELEMENTS).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh, PartitionSpec
from orchestra_jax.kernels import dispatch
from orchestra_jax.kernels import logprob_math as lm
from orchestra_jax.kernels import logprob_pallas as pk
from orchestra_jax.kernels import logprob_reference as ref


def _backend(impl: str, temperature: float, with_entropy: bool = True,
             keep_logits: bool = True) -> tuple[Callable, Callable]:
    """(stats_fn, grads_fn) for an implementation. stats_fn returns (the summary, what the backward may reuse:
    the reference path's logits when keep_logits and they fit its budget, or None); grads_fn takes that as
    `saved`, and mean_z = g_entropy = None when the loss has no entropy term (the reference path then skips
    that work, the Pallas kernels get zeros)."""
    kind = dispatch.resolve_impl(impl)
    if kind == "reference":
        def stats(hidden_TH, w_HV, targets_T):
            keep = keep_logits and ref.keeps_logits(hidden_TH.shape[0], w_HV.shape[1])
            return ref.reference_stats(hidden_TH, w_HV, targets_T, temperature=temperature,
                                       with_entropy=with_entropy, keep_logits=keep)

        def grads(*args, saved=None):
            return ref.reference_grads(*args, temperature=temperature, logits_NTC=saved)

        return stats, grads
    interpret = kind == "interpret"

    def pallas_stats(hidden_TH, w_HV, targets_T):
        # The kernels read W in the hidden states' dtype (the reference path casts a wider W chunk by chunk).
        return pk.pallas_stats(hidden_TH, w_HV.astype(hidden_TH.dtype), targets_T, temperature=temperature,
                               interpret=interpret), None

    def pallas_grads(hidden_TH, w_HV, targets_T, lse_T, mean_z_T, g_logprob_T, g_entropy_T, saved=None):
        if g_entropy_T is None:
            mean_z_T, g_entropy_T = jnp.zeros_like(lse_T), jnp.zeros_like(lse_T)
        args = (hidden_TH, w_HV.astype(hidden_TH.dtype), targets_T, lse_T, mean_z_T, g_logprob_T, g_entropy_T)
        dh_TH, dw_HV = pk.pallas_grads(*args, temperature=temperature, interpret=interpret)
        return dh_TH, dw_HV.astype(w_HV.dtype)

    return pallas_stats, pallas_grads


def _check(hidden_TH, w_HV, targets_T, temperature) -> None:
    if hidden_TH.ndim != 2 or w_HV.ndim != 2 or targets_T.ndim != 1:
        raise ValueError(
            f"fused_logprob: want hidden [T, H], w [H, V], targets [T]; got {hidden_TH.shape}, {w_HV.shape}, "
            f"{targets_T.shape} (flatten batch dims first)"
        )
    if hidden_TH.shape[1] != w_HV.shape[0] or hidden_TH.shape[0] != targets_T.shape[0]:
        raise ValueError(
            f"fused_logprob: shapes disagree: hidden {hidden_TH.shape}, w {w_HV.shape}, targets {targets_T.shape}"
        )
    if not jnp.issubdtype(targets_T.dtype, jnp.integer):
        raise ValueError(f"fused_logprob: targets must be integers, got {targets_T.dtype}")
    if not temperature > 0:
        raise ValueError(f"fused_logprob: temperature must be > 0, got {temperature}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(hidden_TH, w_HV, targets_T, temperature, impl, with_entropy):
    return _forward(hidden_TH, w_HV, targets_T, temperature, impl, with_entropy)[0]


def _forward(hidden_TH, w_HV, targets_T, temperature, impl, with_entropy):
    """Outputs logprob, or (logprob, entropy) when with_entropy (static): without it, neither pass touches the
    first moment u or the entropy term of ∂z."""
    stats_fn, _ = _backend(impl, temperature, with_entropy)
    stats, saved = stats_fn(hidden_TH, w_HV, targets_T)
    logprob_T, entropy_T, lse_T, mean_z_T = lm.finish_stats(stats)
    if not with_entropy:
        return logprob_T, (hidden_TH, w_HV, targets_T, lse_T, None, saved)
    return (logprob_T, entropy_T), (hidden_TH, w_HV, targets_T, lse_T, mean_z_T, saved)


def _fused_fwd(hidden_TH, w_HV, targets_T, temperature, impl, with_entropy):
    # symbolic_zeros: the primal inputs arrive wrapped (value, perturbed).
    return _forward(hidden_TH.value, w_HV.value, targets_T.value, temperature, impl, with_entropy)


def _fused_bwd(temperature, impl, with_entropy, residuals, cotangents):
    """An entropy that is only logged (its cotangent a symbolic zero) skips the entropy term of ∂z: in a train
    step without an entropy bonus that term cost more than the rest of the backward."""
    hidden_TH, w_HV, targets_T, lse_T, mean_z_T, saved = residuals
    g_logprob_T, g_entropy_T = cotangents if with_entropy else (cotangents, None)
    if isinstance(g_entropy_T, SymbolicZero):
        mean_z_T, g_entropy_T = None, None
    if isinstance(g_logprob_T, SymbolicZero):
        g_logprob_T = jnp.zeros_like(lse_T)
    _, grads_fn = _backend(impl, temperature, with_entropy)
    dh_TH, dw_HV = grads_fn(hidden_TH, w_HV, targets_T, lse_T, mean_z_T, g_logprob_T, g_entropy_T,
                            saved=saved)
    return dh_TH, dw_HV, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def fused_logprob(
    hidden_TH: jax.Array,
    w_HV: jax.Array,
    targets_T: jax.Array,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """log p(target) per token (fp32, never positive), and the entropy of p if asked, for p = softmax(h·W/τ).

    hidden [T, H] and w [H, V] may be bf16 or fp32 (accumulation is fp32); the logits are computed in hidden's
    dtype, so an fp32 w with bf16 hidden states is read as bf16 (the reference path casts it chunk by chunk, with
    no whole bf16 copy) and its gradient comes back in fp32. Differentiable in hidden and w.
    impl: "auto" | "pallas" | "interpret" | "reference" (see dispatch).
    """
    hidden_TH, w_HV, targets_T = jnp.asarray(hidden_TH), jnp.asarray(w_HV), jnp.asarray(targets_T)
    _check(hidden_TH, w_HV, targets_T, temperature)
    dispatch.resolve_impl(impl)
    return _fused(
        hidden_TH, w_HV, targets_T.astype(jnp.int32), float(temperature), impl, bool(return_entropy)
    )


def sharded_fused_logprob(
    hidden_TH: jax.Array,
    w_HV: jax.Array,
    targets_T: jax.Array,
    *,
    mesh: Mesh,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    vocab_axis: str = "tensor",
    token_axes: Sequence[str] = ("data", "fsdp"),
):
    """fused_logprob with W's columns split over `vocab_axis` and the tokens over `token_axes` of `mesh`.

    Each vocabulary shard reduces its columns to (max, sum-exp, first moment, target logit); pmax/psum merge
    them. The backward gives each shard its columns of ∂W (summed over token shards) and its part of ∂h
    (summed over vocabulary shards).
    """
    hidden_TH, w_HV, targets_T = jnp.asarray(hidden_TH), jnp.asarray(w_HV), jnp.asarray(targets_T)
    _check(hidden_TH, w_HV, targets_T, temperature)
    dispatch.resolve_impl(impl)
    token_axes = tuple(token_axes)
    token_shards = math.prod(mesh.shape[a] for a in token_axes)
    if hidden_TH.shape[0] % token_shards or w_HV.shape[1] % mesh.shape[vocab_axis]:
        raise ValueError(
            f"sharded_fused_logprob: T={hidden_TH.shape[0]} must divide by {token_shards} token shards "
            f"{token_axes} and V={w_HV.shape[1]} by {mesh.shape[vocab_axis]} '{vocab_axis}' shards"
        )
    # No kept logits here: they would have to leave the shard_map as one more sharded output.
    stats_fn, grads_fn = _backend(impl, float(temperature), keep_logits=False)
    tok = PartitionSpec(token_axes or None)
    rows = PartitionSpec(token_axes or None, None)
    cols = PartitionSpec(None, vocab_axis)

    def shard_map(f, in_specs, out_specs):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def local_targets(targets_T, w_HV):
        return targets_T - jax.lax.axis_index(vocab_axis) * w_HV.shape[1]

    def local_forward(hidden_TH, w_HV, targets_T):
        (m, s, u, tz), _ = stats_fn(hidden_TH, w_HV, local_targets(targets_T, w_HV))
        m_all = jax.lax.pmax(m, vocab_axis)
        s, u = lm.rescale(m_all, m, s, u)
        total = jax.lax.psum((s, u, tz), vocab_axis)
        return lm.finish_stats((m_all, *total))

    def local_backward(hidden_TH, w_HV, targets_T, lse_T, mean_z_T, g_logprob_T, g_entropy_T):
        targets_T = local_targets(targets_T, w_HV)
        dh_TH, dw_HV = grads_fn(hidden_TH, w_HV, targets_T, lse_T, mean_z_T, g_logprob_T, g_entropy_T)
        dh_TH = jax.lax.psum(dh_TH, vocab_axis)
        return dh_TH, (jax.lax.psum(dw_HV, token_axes) if token_axes else dw_HV)

    forward = shard_map(local_forward, (rows, cols, tok), (tok,) * 4)
    backward = shard_map(local_backward, (rows, cols) + (tok,) * 5, (rows, cols))

    @jax.custom_vjp
    def fused(hidden_TH, w_HV, targets_T):
        return fused_fwd(hidden_TH, w_HV, targets_T)[0]

    def fused_fwd(hidden_TH, w_HV, targets_T):
        logprob_T, entropy_T, lse_T, mean_z_T = forward(hidden_TH, w_HV, targets_T)
        return (logprob_T, entropy_T), (hidden_TH, w_HV, targets_T, lse_T, mean_z_T)

    def fused_bwd(residuals, cotangents):
        dh_TH, dw_HV = backward(*residuals, *cotangents)
        return dh_TH, dw_HV, None

    fused.defvjp(fused_fwd, fused_bwd)
    logprob_T, entropy_T = fused(hidden_TH, w_HV, targets_T.astype(jnp.int32))
    return (logprob_T, entropy_T) if return_entropy else logprob_T
