"""Trainer pieces that need no model: scoring trajectories, masking malformed turns, building samples."""

from types import SimpleNamespace

import numpy as np

from orchestra_jax.config import preset
from orchestra_jax.rl.trainer import _mask_malformed_turns, rl_samples, score


def fake_trajectory(group, correct, cost, counts, answer="42", malformed=(False, False)):
    sample = SimpleNamespace(token_ids=tuple(range(1, 13)), loss_mask=(0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0),
                             behaviour_logprobs=tuple(-0.5 for _ in range(12)))
    return SimpleNamespace(
        group_id=group, correct=correct, tool_names=("python", "expert", "answer"),
        tool_counts=dict(zip(("python", "expert", "answer"), counts)), preference=(0, 0, 0, 1.0, 1.0, 0.0),
        ledger=SimpleNamespace(cost_usd=cost, tool_latency_s=1.0), has_valid_answer=answer is not None,
        samples=(sample,), malformed_turns=malformed,
    )


def test_score_prefers_the_cheaper_correct_rollout_and_filters():
    config = preset("cpu-demo")
    trajs = [fake_trajectory(0, True, 0.01, (1, 0, 1)), fake_trajectory(0, True, 0.5, (0, 1, 1)),
             fake_trajectory(0, False, 0.02, (1, 0, 1)), fake_trajectory(0, False, 0.03, (0, 0, 0), answer=None),
             fake_trajectory(1, True, 0.1, (1, 0, 1)), fake_trajectory(1, True, 0.1, (1, 0, 1))]
    rewards, advantages, keep = score(config, trajs)
    assert rewards[0] > rewards[1] > rewards[2] == 0 and rewards[3] == 0
    assert advantages[0] > 0 > advantages[2]
    np.testing.assert_array_equal(keep, [1, 1, 1, 0, 0, 0])  # no answer; group 1 is flat


def test_malformed_turns_lose_their_tokens():
    mask = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(_mask_malformed_turns(mask, (True, False), False, 0), [0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(_mask_malformed_turns(mask, (False, True), False, 0), [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(_mask_malformed_turns(mask, (False, True), True, 1), np.zeros(10))
    config = preset("cpu-demo")
    traj = fake_trajectory(0, True, 0.1, (1, 0, 1), malformed=(False, True))
    (sample,) = rl_samples(config, [traj], np.array([0.7]), np.array([1.0]), np.array([True]))
    assert sample.advantage == 0.7 and sample.loss_mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert rl_samples(config, [traj], np.array([0.7]), np.array([1.0]), np.array([False])) == []
