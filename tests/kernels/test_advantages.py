"""GAE and group advantages against float64 Python loops written from the formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from orchestra_jax.kernels import gae, group_advantages
from orchestra_jax.kernels.advantages import gae_pallas, group_advantages_pallas

IMPLS = ["reference", "interpret"]


def gae_loop(rewards, values, mask, gamma, lam):
    """Per row, walk back over the unmasked positions only (masked ones are skipped and get 0)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    ret = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
    return adv, ret


def group_loop(rewards, ids, eps, unbiased, clip):
    out = np.zeros(len(rewards))
    for i, g in enumerate(ids):
        members = [float(r) for r, h in zip(rewards, ids) if h == g]
        mean = sum(members) / len(members)
        dof = len(members) - 1 if unbiased else len(members)
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / dof) if dof > 0 else 0.0
        a = 0.0 if max(members) == min(members) else (rewards[i] - mean) / (std + eps)
        out[i] = a if clip is None else min(max(a, -clip), clip)
    return out


def fresh_rng():
    return np.random.default_rng(np.random.SeedSequence().entropy % 2**32)


@pytest.mark.parametrize("impl", IMPLS)
def test_gae_matches_loop_with_masks(impl):
    rng = fresh_rng()
    rows, steps = 5, 11
    rewards = rng.normal(size=(rows, steps)).astype(np.float32)
    values = rng.normal(size=(rows, steps)).astype(np.float32)
    mask = rng.random((rows, steps)) > 0.3
    mask[1] = False  # a fully masked row
    mask[2] = True
    gamma, lam = float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.8, 1.0))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, impl=impl)
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(adv)[1]) and not np.any(np.asarray(ret)[~mask])


@pytest.mark.parametrize("impl", IMPLS)
def test_gae_single_step_and_reward_to_go(impl):
    rng = fresh_rng()
    r = rng.normal(size=(3, 1)).astype(np.float32)
    v = rng.normal(size=(3, 1)).astype(np.float32)
    adv, ret = gae(r, v, np.ones((3, 1)), gamma=0.9, lam=0.5, impl=impl)
    np.testing.assert_allclose(np.asarray(adv), r - v, rtol=1e-6)
    # gamma = lam = 1 and V = 0: the return is the undiscounted reward-to-go.
    r = rng.normal(size=(2, 6)).astype(np.float32)
    _, ret = gae(r, np.zeros_like(r), np.ones_like(r), gamma=1.0, lam=1.0, impl=impl)
    np.testing.assert_allclose(np.asarray(ret), np.cumsum(r[:, ::-1], axis=1)[:, ::-1], rtol=1e-5, atol=1e-6)


def test_gae_pallas_writes_every_element_of_poisoned_outputs():
    rng = fresh_rng()
    r, v = rng.normal(size=(2, 37, 9)).astype(np.float32)  # 37 rows: two blocks of 32, the second padded
    mask = (rng.random((37, 9)) > 0.5).astype(np.float32)
    adv, ret = gae_pallas(r, v, mask, gamma=0.95, lam=0.9, interpret=True, poison=True)
    assert np.all(np.isfinite(np.asarray(adv))) and np.all(np.isfinite(np.asarray(ret)))
    want_adv, _ = gae_loop(r, v, mask > 0, 0.95, 0.9)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("unbiased, clip", [(False, None), (True, 1.5)])
def test_group_advantages_match_loop(impl, unbiased, clip):
    rng = fresh_rng()
    n = 150  # more than one 128-wide Pallas block
    ids = rng.choice([-7, 3, 11, 12, 99, 1000], size=n)
    rewards = rng.normal(size=n).astype(np.float32)
    got = group_advantages(rewards, ids, eps=1e-6, unbiased=unbiased, clip=clip, impl=impl)
    np.testing.assert_allclose(
        np.asarray(got), group_loop(rewards, ids, 1e-6, unbiased, clip), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_group_edge_cases_pairs_equal_rewards_singletons(impl):
    rng = fresh_rng()
    pair = rng.normal(size=2)
    equal = np.full(4, rng.normal()) + 0.1  # sums of equal floats can round; the answer must be 0 exactly
    rewards = np.concatenate([pair, equal, [rng.normal()]]).astype(np.float32)
    ids = np.array([5, 5, 8, 8, 8, 8, 2])
    got = np.asarray(group_advantages(rewards, ids, impl=impl))
    np.testing.assert_allclose(got, group_loop(rewards, ids, 1e-6, False, None), rtol=1e-4, atol=1e-5)
    # A pair: population std is |a − b| / 2, so the advantages are ±1 (up to ε).
    np.testing.assert_allclose(np.abs(got[:2]), 1.0, rtol=1e-2)
    assert np.all(got[2:] == 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_nan_reward_makes_its_own_group_nan_and_no_other(impl):
    rng = fresh_rng()
    rewards = rng.normal(size=6).astype(np.float32)
    rewards[rng.integers(3)] = np.nan
    got = np.asarray(group_advantages(rewards, np.array([1, 1, 1, 4, 4, 4]), impl=impl))
    assert np.all(np.isnan(got[:3]))
    np.testing.assert_allclose(got[3:], group_loop(rewards[3:], np.zeros(3, int), 1e-6, False, None), rtol=1e-4,
                               atol=1e-5)


def test_group_pallas_writes_every_element_of_poisoned_outputs():
    rng = fresh_rng()
    rewards = rng.normal(size=70).astype(np.float32)
    ids = rng.integers(0, 9, size=70).astype(np.int32)
    got = group_advantages_pallas(
        jnp.asarray(rewards),
        jnp.asarray(ids),
        eps=1e-6,
        unbiased=False,
        clip=None,
        interpret=True,
        poison=True,
        block=32,
    )
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(
        np.asarray(got), group_loop(rewards, ids, 1e-6, False, None), rtol=1e-4, atol=1e-5
    )


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        gae(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="gamma"):
        gae(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)), gamma=1.5, lam=1.0)
    with pytest.raises(ValueError, match="integers"):
        group_advantages(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="one \\[N\\] shape"):
        group_advantages(np.zeros(3), np.zeros(4, np.int32))
