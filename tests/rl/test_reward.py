"""The multi-objective reward: hand-computed values and properties (hypothesis) from DESIGN.md section 4."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestra_jax.rl.reward import group_advantages, keep_mask, multi_objective_reward


def test_hand_computed_group():
    # One group of three rollouts, K = 2 tools. Rollout 2 is incorrect, so it earns 0.
    counts = np.array([[2, 0], [1, 1], [0, 3]])
    correct = np.array([1, 1, 0])
    cost = np.array([0.5, 0.1, 0.3])
    latency = np.array([2.0, 4.0, 3.0])
    pref = np.tile([0.5, 0.0, 1.0, 1.0, 0.25], (3, 1))
    r = multi_objective_reward(counts, correct, cost, latency, pref, np.zeros(3, int))
    # tool1: [1, .5, 0]; tool2: [0, 1/3, 1]; outcome: [1, 1, 0]; -cost: [-.5,-.1,-.3] -> [0, 1, .5];
    # -latency: [-2,-4,-3] -> [1, 0, .5]
    expected = [0.5 * 1 + 1 * 1 + 1 * 0 + 0.25 * 1, 0.5 * 0.5 + 1 * 1 + 1 * 1 + 0.25 * 0, 0.0]
    np.testing.assert_allclose(r, expected)


def test_constant_column_normalises_to_zero_and_groups_are_separate():
    counts = np.array([[1], [1], [0], [5]])
    pref = np.tile([1.0, 1.0, 1.0, 1.0], (4, 1))
    r = multi_objective_reward(counts, [1, 1, 1, 1], [1, 1, 2, 1], [3, 3, 1, 1], pref, [7, 7, 9, 9])
    # Group 7: every column equal -> 0. Group 9: tool [0, 1]; cost -> [0, 1]; latency equal.
    np.testing.assert_allclose(r, [0, 0, 0, 2])


def test_released_mode_rewards_spending_and_uses_min_over_users():
    counts = np.array([[0, 2], [3, 1], [1, 1]])
    pref = np.tile([1.0, 0.0, 0.0, 1.0, 0.0], (3, 1))
    cost = np.array([1.0, 2.0, 3.0])
    paper = multi_objective_reward(counts, [1, 1, 1], cost, [0, 0, 0], pref, [0, 0, 0])
    released = multi_objective_reward(counts, [1, 1, 1], cost, [0, 0, 0], pref, [0, 0, 0], mode="released")
    # paper: tool1 [0, 1, 1/3]; -cost [1, .5, 0]
    np.testing.assert_allclose(paper, [1.0, 1.5, 1 / 3])
    # released: tool1 min and max over its users {3, 1}, so the non-user gets (0 - 1) / 2: [-.5, 1, 0];
    # +cost against the range of -cost [-3, -1]: (c + 3) / 2 = [2, 2.5, 3], plus the second visit (0 + 3) / 2
    np.testing.assert_allclose(released, [-0.5 + 3.5, 1 + 4.0, 0 + 4.5])


def _released_loop(counts, correct, cost, latency, pref, groups):
    """The released reward as its code computes it, one rollout and one feature at a time: per group, min and max
    of each used tool's count over its users and of correct, -cost and -latency over every rollout; each correct
    rollout then sums pref * (value - min) / (max - min) over the group's features where max > min, visiting
    outcome, cost and latency once with a count of 0 (their key is in the feature table) and once with their own
    value (+cost and +latency)."""
    n, k = counts.shape
    out = np.zeros(n)
    for g in set(groups.tolist()):
        rows = [i for i in range(n) if groups[i] == g]
        lo, hi = {}, {}
        for i in rows:
            values = {t: counts[i, t] for t in range(k) if counts[i, t] > 0}
            values.update(outcome=float(correct[i]), cost=-cost[i], latency=-latency[i])
            for name, v in values.items():
                lo[name], hi[name] = min(lo.get(name, v), v), max(hi.get(name, v), v)
        weight = {**{t: t for t in range(k)}, "outcome": k, "cost": k + 1, "latency": k + 2}
        for i in rows:
            if not correct[i]:
                continue
            own = {"outcome": float(correct[i]), "cost": cost[i], "latency": latency[i]}
            for name in lo:
                if hi[name] > lo[name]:
                    first = counts[i, name] if isinstance(name, int) else 0.0
                    out[i] += pref[i, weight[name]] * (first - lo[name]) / (hi[name] - lo[name])
                    if name in own:
                        out[i] += pref[i, weight[name]] * (own[name] - lo[name]) / (hi[name] - lo[name])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3).flatmap(lambda n_groups: st.tuples(*[st.integers(2, 6)] * n_groups)), st.randoms())
def test_released_mode_matches_the_released_loop(sizes, rnd):
    rng = np.random.default_rng(rnd.randrange(1 << 30))
    n, k = sum(sizes), 2
    counts = rng.integers(0, 4, (n, k)).astype(float)
    correct = rng.random(n) < 0.7
    cost, latency = rng.random(n) * 3, rng.random(n) * 10
    pref = np.repeat(rng.random((len(sizes), k + 3)), sizes, axis=0)
    groups = np.repeat(np.arange(len(sizes)) * 7, sizes)
    got = multi_objective_reward(counts, correct, cost, latency, pref, groups, mode="released")
    np.testing.assert_allclose(got, _released_loop(counts, correct, cost, latency, pref, groups), atol=1e-12)


def test_released_mode_uses_the_sample_std():
    rewards, groups = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.2, 0.2, 0.0]), np.repeat([0, 1, 2], 3)
    adv = group_advantages(rewards[:6], np.zeros(6), clip=None, mode="released")
    np.testing.assert_allclose(adv, (rewards[:6] - 0.5) / (np.std(rewards[:6], ddof=1) + 1e-6), rtol=1e-5)
    # Group 2's population std is 0.094 (< 0.1, dropped by the paper's filter), its sample std 0.115 (kept).
    np.testing.assert_array_equal(keep_mask(rewards, groups, np.ones(9)), [1] * 6 + [0] * 3)
    np.testing.assert_array_equal(keep_mask(rewards, groups, np.ones(9), mode="released"), [1] * 9)


def test_non_finite_inputs_name_the_argument_and_rollout():
    args = [np.zeros((3, 1)), [1, 1, 1], [0.0, np.nan, 1.0], [0, 0, 0], np.ones((3, 4)), [0, 0, 0]]
    with pytest.raises(ValueError, match=r"cost: not finite at rollout 1 \(nan\)"):
        multi_objective_reward(*args)
    args[2], args[3] = [0, 0, 0], [0, 0, np.inf]
    with pytest.raises(ValueError, match="latency: not finite at rollout 2"):
        multi_objective_reward(*args)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="preference"):
        multi_objective_reward(np.zeros((2, 1)), [1, 1], [0, 0], [0, 0], np.zeros((2, 3)), [0, 0])
    with pytest.raises(ValueError, match="cost"):
        multi_objective_reward(np.zeros((2, 1)), [1, 1], [0], [0, 0], np.zeros((2, 4)), [0, 0])


def test_keep_mask_drops_flat_groups_and_invalid_answers():
    rewards = np.array([0.0, 1.0, 0.5, 0.5, 0.0, 2.0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    has_answer = np.array([1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(keep_mask(rewards, groups, has_answer), [1, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(
        keep_mask(rewards, groups, has_answer, drop_invalid_answers=False), [1, 1, 0, 0, 1, 1]
    )


# ------------------------------------------------------------------------------------------- properties


@st.composite
def groups(draw, min_size=2, max_size=8):
    n = draw(st.integers(min_size, max_size))
    k = draw(st.integers(1, 3))
    floats = st.floats(0, 10, allow_nan=False, width=32)
    counts = np.array(draw(st.lists(st.lists(st.integers(0, 4), min_size=k, max_size=k), min_size=n, max_size=n)))
    correct = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    cost = np.array(draw(st.lists(floats, min_size=n, max_size=n)))
    latency = np.array(draw(st.lists(floats, min_size=n, max_size=n)))
    pref_row = np.array(draw(st.lists(st.floats(0, 1), min_size=k + 3, max_size=k + 3)))
    return counts, correct, cost, latency, np.tile(pref_row, (n, 1))


@settings(max_examples=60, deadline=None)
@given(groups(), st.sampled_from(["paper", "released"]))
def test_incorrect_rollouts_earn_zero(group, mode):
    counts, correct, cost, latency, pref = group
    r = multi_objective_reward(counts, correct, cost, latency, pref, np.zeros(len(correct)), mode=mode)
    assert np.all(r[~correct] == 0)
    assert np.all(np.isfinite(r))


@settings(max_examples=60, deadline=None)
@given(groups(), st.randoms(use_true_random=False))
def test_permuting_a_group_permutes_rewards(group, rnd):
    counts, correct, cost, latency, pref = group
    n = len(correct)
    perm = np.array(rnd.sample(range(n), n))
    g = np.zeros(n)
    r = multi_objective_reward(counts, correct, cost, latency, pref, g)
    r_perm = multi_objective_reward(counts[perm], correct[perm], cost[perm], latency[perm], pref[perm], g)
    np.testing.assert_allclose(r_perm, r[perm], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(groups(), st.integers(0, 7), st.floats(0.01, 5), st.sampled_from([-2, -1]))
def test_cheaper_or_faster_correct_rollout_never_earns_less(group, i, saving, column):
    counts, correct, cost, latency, pref = group
    n = len(correct)
    i = i % n
    j = (i + 1) % n
    # Make rollout j an exact copy of rollout i except cheaper (column -2) or faster (column -1).
    counts[j], correct[i], correct[j] = counts[i], True, True
    cost[j], latency[j] = cost[i], latency[i]
    metric = cost if column == -2 else latency
    metric[j] = max(metric[i] - saving, 0.0)
    pref[:, column] = np.maximum(pref[:, column], 0.1)
    r = multi_objective_reward(counts, correct, cost, latency, pref, np.zeros(n))
    assert r[j] >= r[i] - 1e-12
    if metric[i] - metric[j] > 1e-6 * (1 + np.ptp(metric)):  # strictly cheaper beyond float rounding
        assert r[j] > r[i]


@settings(max_examples=60, deadline=None)
@given(groups(), st.floats(0.01, 100), st.integers(0, 2))
def test_each_metric_is_scale_invariant(group, scale, which):
    counts, correct, cost, latency, pref = group
    g = np.zeros(len(correct))
    r = multi_objective_reward(counts, correct, cost, latency, pref, g)
    if which == 0:
        scaled = multi_objective_reward(counts, correct, cost * scale, latency, pref, g)
    elif which == 1:
        scaled = multi_objective_reward(counts, correct, cost, latency * scale, pref, g)
    else:
        scaled = multi_objective_reward(counts * scale, correct, cost, latency, pref, g)
    np.testing.assert_allclose(scaled, r, atol=1e-9)


def test_group_advantages_zscore_clip_and_released_boost():
    rng = np.random.default_rng()
    rewards = rng.normal(size=12)
    groups = np.repeat([5, 11, 2], 4)
    adv = group_advantages(rewards, groups, clip=None)
    for g in np.unique(groups):
        r = rewards[groups == g]
        np.testing.assert_allclose(adv[groups == g], (r - r.mean()) / (r.std() + 1e-6), rtol=1e-4, atol=1e-5)
    clipped = group_advantages(np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 10.0]), np.zeros(10), clip=1.5)
    assert clipped.max() == pytest.approx(1.5) and clipped.min() < 0
    rewards = np.array([0.0, 0.0, 0.0, 1.0])  # sample std 0.5: A = [-.5, -.5, -.5, 1.5], and 1.5 >= 1 gets +0.1
    boosted = group_advantages(rewards, np.zeros(4), mode="released")
    np.testing.assert_allclose(boosted, [-0.5, -0.5, -0.5, 1.6], atol=1e-5)
