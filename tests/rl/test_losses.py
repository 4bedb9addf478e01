"""Loss maths against hand-computed values and a float64 reference written per element from the formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestra_jax.rl.losses import (
    PolicyLossConfig,
    aggregation_weights,
    clipped_surrogate,
    kl_estimate,
    policy_objective,
    truncated_is_weights,
    value_loss,
)


def reference_surrogate(logp, old, adv, cl, ch, c):
    """PPO clip + dual clip, one token at a time, in float64 Python with explicit branches."""
    out = []
    for lp, ol, a in zip(logp.tolist(), old.tolist(), adv.tolist()):
        r = math.exp(lp - ol)
        if a >= 0:
            loss = -a * min(r, 1 + ch)
        else:
            loss = -a * max(r, 1 - cl)
            if c is not None:
                loss = min(loss, -a * c)
        out.append(loss)
    return np.array(out)


def reference_kl(logp, ref, estimator):
    out = []
    for lp, rf in zip(logp.tolist(), ref.tolist()):
        d = lp - rf
        out.append({"k1": d, "k2": d * d / 2, "k3": math.exp(-d) + d - 1}[estimator])
    return np.array(out)


def test_surrogate_hand_values():
    logp = jnp.log(jnp.array([1.5, 0.5, 1.1, 0.5, 20.0]))
    old = jnp.zeros(5)
    adv = jnp.array([1.0, 1.0, -2.0, -2.0, -1.0])
    loss, stats = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    # r=1.5, A=1: min(r, 1.28) -> -1.28.  r=.5, A=1: -.5.  r=1.1, A=-2: 2.2.  r=.5, A=-2: max(.5,.8) -> 1.6.
    # r=20, A=-1: 20 capped by dual clip at 10.
    np.testing.assert_allclose(loss, [-1.28, -0.5, 2.2, 1.6, 10.0], rtol=1e-6)
    np.testing.assert_array_equal(stats["clip_high"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(stats["clip_low"], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(stats["dual_clip"], [0, 0, 0, 0, 1])


@pytest.mark.parametrize("dual", [None, 3.0])
def test_surrogate_matches_float64_reference(dual):
    rng = np.random.default_rng()
    logp = rng.normal(-2, 1, 512)
    old = logp + rng.normal(0, 0.5, 512)
    adv = rng.normal(0, 2, 512)
    loss, _ = clipped_surrogate(
        jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
        clip_low=0.2, clip_high=0.28, dual_clip=dual,
    )
    np.testing.assert_allclose(loss, reference_surrogate(logp, old, adv, 0.2, 0.28, dual), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_float64_reference(estimator):
    rng = np.random.default_rng()
    logp = rng.normal(-2, 1, 256)
    ref = logp + rng.normal(0, 0.3, 256)
    got = kl_estimate(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), estimator)
    np.testing.assert_allclose(got, reference_kl(logp, ref, estimator), rtol=1e-4, atol=1e-6)
    if estimator != "k1":
        assert np.all(np.asarray(got) >= 0)


def test_kl_hand_values():
    logp, ref = jnp.array([-1.0]), jnp.array([-1.5])
    assert float(kl_estimate(logp, ref, "k1")[0]) == pytest.approx(0.5)
    assert float(kl_estimate(logp, ref, "k2")[0]) == pytest.approx(0.125)
    assert float(kl_estimate(logp, ref, "k3")[0]) == pytest.approx(math.exp(-0.5) - 1 + 0.5, rel=1e-6)


def test_on_policy_gradient_is_minus_advantage():
    # With old = stop_gradient(logp), d loss / d logp = -A exactly (the REINFORCE gradient), plus the KL term.
    rng = np.random.default_rng()
    logp = jnp.asarray(rng.normal(-1, 0.5, 64), jnp.float32)
    ref = jnp.asarray(rng.normal(-1, 0.5, 64), jnp.float32)
    adv = jnp.asarray(rng.normal(0, 1, 64), jnp.float32)
    config = PolicyLossConfig(kl_coef=0.1, kl_estimator="k2")
    grad = jax.grad(lambda lp: policy_objective(lp, adv, config, ref_logp=ref)[0].sum())(logp)
    np.testing.assert_allclose(grad, -adv + 0.1 * (logp - ref), rtol=1e-5, atol=1e-6)


def test_kl_in_reward_leaves_the_loss_to_the_surrogate_and_only_measures_the_kl():
    """The trainer takes the KL into the advantages (GRPO) or GAE's rewards (PPO) before the step."""
    rng = np.random.default_rng()
    logp = jnp.asarray(rng.normal(-1, 0.5, 32), jnp.float32)
    ref = jnp.asarray(rng.normal(-1, 0.5, 32), jnp.float32)
    adv = jnp.asarray(rng.normal(0, 1, 32), jnp.float32)
    config = PolicyLossConfig(kl_coef=0.5, kl_estimator="k1", kl_in_reward=True)
    grad = jax.grad(lambda lp: policy_objective(lp, adv, config, ref_logp=ref)[0].sum())(logp)
    np.testing.assert_allclose(grad, -adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy_objective(logp, adv, config, ref_logp=ref)[1]["kl"], logp - ref, rtol=1e-6)


def test_entropy_bonus_and_tis():
    logp = jnp.array([-1.0, -2.0])
    old = jnp.array([-1.0, -2.0])
    behaviour = jnp.array([-3.0, -2.5])
    adv = jnp.array([1.0, -1.0])
    entropy = jnp.array([2.0, 4.0])
    config = PolicyLossConfig(entropy_coef=0.01, tis_cap=2.0)
    loss, stats = policy_objective(logp, adv, config, old_logp=old, behaviour_logp=behaviour, entropy=entropy)
    w = np.minimum(np.exp([2.0, 0.5]), 2.0)
    np.testing.assert_allclose(loss, [-1.0 * w[0] - 0.02, 1.0 * w[1] - 0.04], rtol=1e-6)
    np.testing.assert_array_equal(stats["tis_truncated"], [1, 0])
    np.testing.assert_allclose(truncated_is_weights(old, behaviour, 2.0), w, rtol=1e-6)


def test_value_loss():
    np.testing.assert_allclose(value_loss(jnp.array([1.0, 3.0]), jnp.array([2.0, 0.0])), [0.5, 4.5])


def test_aggregation_weights():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    seq = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
    loss = np.random.default_rng().normal(size=mask.shape)
    tok = (aggregation_weights(mask, seq, "token-mean") * loss).sum()
    np.testing.assert_allclose(tok, (loss[0, 0] + loss[0, 1] + loss[0, 2] + loss[1, 0]) / 4, rtol=1e-6)
    smtm = (aggregation_weights(mask, seq, "seq-mean-token-mean") * loss).sum()
    np.testing.assert_allclose(smtm, ((loss[0, 0] + loss[0, 1]) / 2 + loss[0, 2] + loss[1, 0]) / 3, rtol=1e-6)
    smts = (aggregation_weights(mask, seq, "seq-mean-token-sum") * loss).sum()
    np.testing.assert_allclose(smts, (loss[0, 0] + loss[0, 1] + loss[0, 2] + loss[1, 0]) / 3, rtol=1e-6)
    assert not aggregation_weights(np.zeros((2, 3)), np.zeros((2, 3)), "token-mean").any()
