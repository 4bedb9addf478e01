"""GRPO and PPO losses in one module: clipped policy gradient, dual-clip, KL estimators, entropy bonus,
truncated importance sampling, the value loss, and the loss-aggregation weights.

Everything here is per token: the train step multiplies per-token losses by precomputed aggregation weights
(`aggregation_weights`) and sums. Because the weights already carry the global normaliser, summing over
micro-batches gives exactly the full-batch token-mean / seq-mean-token-mean / seq-mean-token-sum.

Sign conventions follow PPO: ratio = exp(logp - old_logp); the clipped surrogate is
max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), and for A < 0 the dual clip caps it at -A c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k2", "k3"]


@dataclass(frozen=True)
class PolicyLossConfig:
    """The knobs of the per-token policy objective (a view of AlgorithmConfig)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 10.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k2"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    tis_cap: float | None = None

    @classmethod
    def from_algorithm(cls, algorithm) -> PolicyLossConfig:
        return cls(
            clip_low=algorithm.clip_low,
            clip_high=algorithm.clip_high,
            dual_clip=algorithm.dual_clip,
            kl_coef=algorithm.kl_coef,
            kl_estimator=algorithm.kl_estimator,
            kl_in_reward=algorithm.kl_in_reward,
            entropy_coef=algorithm.entropy_coef,
            tis_cap=algorithm.tis_cap,
        )


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
    """Per-token estimates of KL(policy || reference) from samples of the policy (Schulman's k1, k2, k3).

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (non-negative).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        neg = -log_ratio
        return jnp.expm1(neg) - neg
    raise ValueError(f"kl_estimator: expected k1, k2 or k3, got {estimator!r}")


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate loss per token (to minimise), with the dual clip for negative advantages.

    Returns the loss and per-token indicator stats: clip_low / clip_high (the clipped branch is active below
    1 - clip_low with A < 0, or above 1 + clip_high with A > 0) and dual_clip (the dual cap is active).
    """
    ratio = jnp.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    stats = {
        "ratio": ratio,
        "clip_low": ((ratio < 1.0 - clip_low) & (advantages < 0)).astype(jnp.float32),
        "clip_high": ((ratio > 1.0 + clip_high) & (advantages > 0)).astype(jnp.float32),
    }
    if dual_clip is not None:
        capped = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss > capped)
        loss = jnp.where(advantages < 0, jnp.minimum(loss, capped), loss)
        stats["dual_clip"] = dual_active.astype(jnp.float32)
    else:
        stats["dual_clip"] = jnp.zeros_like(ratio)
    return loss, stats


def truncated_is_weights(old_logp: jax.Array, behaviour_logp: jax.Array, cap: float) -> jax.Array:
    """min(pi_old / pi_behaviour, cap), without gradient: corrects for rollouts from another engine or a stale step."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp - behaviour_logp), cap))


def policy_objective(
    logp: jax.Array,
    advantages: jax.Array,
    config: PolicyLossConfig,
    *,
    old_logp: jax.Array | None = None,
    behaviour_logp: jax.Array | None = None,
    ref_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-token loss: surrogate x TIS weight + kl_coef KL (unless KL is in the reward) - entropy_coef H.

    `old_logp` defaults to stop_gradient(logp): one optimizer update per batch, so the recomputed old policy
    is the current one. With KL in the reward the trainer has already taken it into the advantages (GRPO) or
    GAE's token rewards (PPO); here it is only measured.
    """
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    stats: dict[str, jax.Array] = {}
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, config.kl_estimator)
        stats["kl"] = jax.lax.stop_gradient(kl)
    loss, surrogate_stats = clipped_surrogate(
        logp, old_logp, advantages, clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip
    )
    stats.update(surrogate_stats)
    if config.tis_cap is not None and behaviour_logp is not None:
        weights = truncated_is_weights(old_logp, behaviour_logp, config.tis_cap)
        loss = loss * weights
        stats["tis_truncated"] = (jnp.exp(old_logp - behaviour_logp) > config.tis_cap).astype(jnp.float32)
    if ref_logp is not None and not config.kl_in_reward and config.kl_coef:
        loss = loss + config.kl_coef * kl
    if entropy is not None:
        stats["entropy"] = jax.lax.stop_gradient(entropy)
        if config.entropy_coef:
            loss = loss - config.entropy_coef * entropy
    return loss, stats


def value_loss(values: jax.Array, returns: jax.Array) -> jax.Array:
    """Per-token squared error of the critic, 0.5 (V - G)^2, against stop-gradient returns."""
    return 0.5 * jnp.square(values - jax.lax.stop_gradient(returns))


def aggregation_weights(mask_BT: np.ndarray, sequence_BT: np.ndarray, mode: Aggregation) -> np.ndarray:
    """Per-token weights whose weighted sum of a per-token loss is the chosen aggregate over the whole batch.

    `sequence_BT` numbers each token's trajectory (any non-negative ints; masked tokens are ignored).
    token-mean: 1 / total tokens; seq-mean-token-mean: 1 / (tokens in its sequence x sequences);
    seq-mean-token-sum: 1 / sequences. An all-masked batch gets all-zero weights.
    """
    mask = np.asarray(mask_BT, dtype=np.float64) > 0
    total = mask.sum()
    if total == 0:
        return np.zeros(mask.shape, np.float32)
    if mode == "token-mean":
        return (mask / total).astype(np.float32)
    seqs = np.asarray(sequence_BT)[mask]
    ids, counts = np.unique(seqs, return_counts=True)
    num_seqs = len(ids)
    if mode == "seq-mean-token-sum":
        return (mask / num_seqs).astype(np.float32)
    if mode == "seq-mean-token-mean":
        per_seq = dict(zip(ids.tolist(), counts.tolist()))
        lengths = np.vectorize(lambda s: per_seq.get(int(s), 1))(np.asarray(sequence_BT))
        return np.where(mask, 1.0 / (lengths * num_seqs), 0.0).astype(np.float32)
    raise ValueError(f"loss_aggregation: unknown mode {mode!r}")
