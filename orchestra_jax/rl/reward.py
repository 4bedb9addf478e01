"""ToolOrchestra's preference-weighted, group-normalised reward (DESIGN.md section 4), filters and advantages.

For a group T of rollouts of one prompt, the metrics are M(tau) = [calls to tool 1..K, r(tau), -cost, -latency].
Each column is min-max normalised over the group (0 where max == min; a tool a rollout never called counts 0
and takes part in min and max), and R(tau) = M_hat(tau) . P when r(tau) = 1, else 0. So with p_cost > 0 a
cheaper correct rollout earns more. Rewards are computed on the host in float64 (they are tiny arrays);
advantages go through the group-advantage kernel.

`mode="released"` reproduces the released code instead (DESIGN.md section 4), term for term:
- +cost and +latency, normalised with the min and max of -cost and -latency, so (c + max c) / (max c - min c),
  which rewards spending; its loop over the features visits cost and latency a second time with a count of 0,
  adding max c / (max c - min c) more (the same visit of the outcome adds 0);
- a tool's min and max taken only over the rollouts that used it, so one that did not gets (0 - min) / span < 0;
- the sample std (n - 1) in the advantages and in the std filter, which keeps a group only when std > 0.1;
- a +0.1 advantage boost where A >= 1 (as DESIGN.md states; the copy of the released reward read for the rest,
  `generation_quick3.py` in a public fork, has no such boost).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Mode = Literal["paper", "released"]


def _group_minmax(values_NC: np.ndarray, group_ids_N: np.ndarray, used_NC: np.ndarray | None = None,
                  range_NC: np.ndarray | None = None) -> np.ndarray:
    """(x - min_T y) / (max_T y - min_T y) per column within each group, with y = `range_NC` (default x); 0
    where max == min.

    With `used_NC`, min and max range only over entries marked used (the released code's tool columns).
    """
    range_NC = values_NC if range_NC is None else range_NC
    out_NC = np.zeros_like(values_NC)
    for group in np.unique(group_ids_N):
        rows = group_ids_N == group
        y = range_NC[rows]
        valid = np.ones_like(y, dtype=bool) if used_NC is None else used_NC[rows]
        lo = np.where(valid, y, np.inf).min(axis=0)
        hi = np.where(valid, y, -np.inf).max(axis=0)
        span = hi - lo
        ok = np.isfinite(span) & (span > 0)
        scaled = (values_NC[rows] - np.where(ok, lo, 0.0)) / np.where(ok, span, 1.0)
        out_NC[rows] = np.where(ok, scaled, 0.0)
    return out_NC


def _released_terms(counts_NK, correct_N, spend_NC, groups_N) -> np.ndarray:
    """The released code's normalised metrics [N, K + 3]; spend_NC is (cost, latency) as positive numbers."""
    tools_NK = _group_minmax(counts_NK, groups_N, used_NC=counts_NK > 0)
    outcome_N1 = _group_minmax(correct_N[:, None], groups_N)
    # +spend against the range of -spend, plus the second visit with a count of 0 (see the module docstring).
    spend_NC = (_group_minmax(spend_NC, groups_N, range_NC=-spend_NC)
                + _group_minmax(np.zeros_like(spend_NC), groups_N, range_NC=-spend_NC))
    return np.concatenate([tools_NK, outcome_N1, spend_NC], axis=1)


def multi_objective_reward(
    tool_counts: np.ndarray,
    correct: np.ndarray,
    cost: np.ndarray,
    latency: np.ndarray,
    preference: np.ndarray,
    group_ids: np.ndarray,
    *,
    mode: Mode = "paper",
) -> np.ndarray:
    """Rewards [N] from tool_counts [N, K], correct [N], cost [N], latency [N], preference [N, K+3] and group_ids [N].

    The preference columns are (tool_1 .. tool_K, outcome, cost, latency), each in [0, 1].
    """
    counts_NK = np.asarray(tool_counts, dtype=np.float64)
    correct_N = np.asarray(correct).astype(bool)
    cost_N = np.asarray(cost, dtype=np.float64)
    latency_N = np.asarray(latency, dtype=np.float64)
    pref_NP = np.asarray(preference, dtype=np.float64)
    groups_N = np.asarray(group_ids)
    n = correct_N.shape[0]
    if counts_NK.ndim != 2 or counts_NK.shape[0] != n:
        raise ValueError(f"tool_counts: expected shape [{n}, K], got {counts_NK.shape}")
    k = counts_NK.shape[1]
    if pref_NP.shape != (n, k + 3):
        raise ValueError(f"preference: expected shape [{n}, {k + 3}] (tools, outcome, cost, latency), got {pref_NP.shape}")
    for name, arr in (("cost", cost_N), ("latency", latency_N), ("group_ids", groups_N)):
        if arr.shape != (n,):
            raise ValueError(f"{name}: expected shape [{n}], got {arr.shape}")
    _check_mode(mode)
    for name, arr in (("tool_counts", counts_NK), ("cost", cost_N), ("latency", latency_N), ("preference", pref_NP)):
        bad = np.argwhere(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{name}: not finite at rollout {bad[0][0]} ({arr[tuple(bad[0])]})")

    if mode == "released":
        normalised_NP = _released_terms(counts_NK, correct_N.astype(np.float64), np.stack([cost_N, latency_N], 1),
                                        groups_N)
    else:
        other_NC = np.stack([correct_N.astype(np.float64), -cost_N, -latency_N], axis=1)
        normalised_NP = np.concatenate([_group_minmax(counts_NK, groups_N), _group_minmax(other_NC, groups_N)], 1)
    reward_N = np.einsum("np,np->n", normalised_NP, pref_NP)
    return np.where(correct_N, reward_N, 0.0)


def _check_mode(mode: str) -> None:
    if mode not in ("paper", "released"):
        raise ValueError(f"mode: expected 'paper' or 'released', got {mode!r}")


def keep_mask(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    has_answer: np.ndarray,
    *,
    min_group_std: float = 0.1,
    drop_invalid_answers: bool = True,
    mode: Mode = "paper",
) -> np.ndarray:
    """Which rollouts train: groups whose reward std is below `min_group_std` teach nothing and are dropped
    (released: kept only above it, by the sample std), and so (optionally) are rollouts that never gave a valid
    answer. Malformed turns are masked per token when the batch is built (see batching.py)."""
    _check_mode(mode)
    rewards_N = np.asarray(rewards, dtype=np.float64)
    groups_N = np.asarray(group_ids)
    keep_N = np.ones(rewards_N.shape, dtype=bool)
    for group in np.unique(groups_N):
        rows = groups_N == group
        if mode == "released":
            keep_N[rows] = rows.sum() > 1 and rewards_N[rows].std(ddof=1) > min_group_std
        elif rewards_N[rows].std() < min_group_std:
            keep_N[rows] = False
    if drop_invalid_answers:
        keep_N &= np.asarray(has_answer, dtype=bool)
    return keep_N


def group_advantages(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    *,
    eps: float = 1e-6,
    clip: float | None = 3.0,
    mode: Mode = "paper",
) -> np.ndarray:
    """A = (R - mean_T R) / (std_T R + eps), optionally clipped to +-clip, via the advantage kernel.

    Group ids may be any integers; they are renumbered densely first. The released mode takes the sample std
    and adds 0.1 where A >= 1.
    """
    from orchestra_jax.kernels import group_advantages as kernel

    _check_mode(mode)
    _, dense_N = np.unique(np.asarray(group_ids), return_inverse=True)
    adv_N = np.asarray(kernel(np.asarray(rewards, dtype=np.float32), dense_N.astype(np.int32), eps=eps, clip=clip,
                              unbiased=mode == "released"), dtype=np.float64)
    if mode == "released":
        adv_N = np.where(adv_N >= 1.0, adv_N + 0.1, adv_N)
    return adv_N
