import json
import random

import numpy as np
import pytest

from orchestra_jax.env.preferences import (
    Preference,
    PreferenceDistribution,
    PreferenceError,
    preference_for_task,
    render_instruction,
    sample_preference,
    sample_preferences,
)

TOOLS = ("search", "enhance_reasoning", "answer")


def test_vector_layout_and_round_trip():
    w = [round(random.random(), 3) for _ in range(6)]
    pref = Preference.from_vector(TOOLS, w)
    assert pref.tool_weight("enhance_reasoning") == w[1] and pref.cost == w[4]
    np.testing.assert_allclose(pref.vector(), np.array(w, np.float32))
    # tools the preference does not name weigh 0, in the caller's order
    np.testing.assert_allclose(
        pref.vector(["answer", "other"]), np.array([w[2], 0.0, w[3], w[4], w[5]], np.float32)
    )
    assert Preference.from_json(json.loads(json.dumps(pref.to_json()))) == pref


@pytest.mark.parametrize(
    "bad",
    [
        {"cost": 1.5},
        {"latency": -0.1},
        {"outcome": float("nan")},
        {"cost": "high"},
        {"tools": {"search": 2}},
        {"speed": 1},
    ],
)
def test_bad_values_are_one_line_errors(bad):
    with pytest.raises(PreferenceError) as info:
        Preference.from_json(bad)
    assert "\n" not in str(info.value)


def test_render_instruction_states_every_weight():
    pref = Preference((("search", 0.8), ("answer", 0.0)), outcome=1.0, cost=0.25, latency=0.5)
    text = render_instruction(pref)
    assert "answer correctly: 1.00 (high)" in text
    assert "keep the dollar cost low: 0.25 (low)" in text
    assert "keep the latency low: 0.50 (medium)" in text
    assert "use the search tool: 0.80 (high)" in text
    assert "answer tool" not in text  # zero-weight tools are not mentioned


@pytest.mark.parametrize("kind", ["uniform", "dirichlet"])
def test_sampling_is_seeded_and_in_range(kind):
    seed = random.randint(0, 10**6)
    dist = PreferenceDistribution(kind=kind)
    a = sample_preferences(50, TOOLS, dist, seed=seed)
    b = sample_preferences(50, TOOLS, dist, seed=seed)
    assert a == b
    vectors = np.stack([p.vector() for p in a])
    assert vectors.shape == (50, 6) and vectors.min() >= 0 and vectors.max() <= 1
    assert len({tuple(v) for v in vectors}) == 50
    if kind == "dirichlet":
        np.testing.assert_allclose(vectors.sum(axis=1), 1.0, rtol=1e-5)
    else:
        assert abs(vectors.mean() - 0.5) < 0.1


def test_fixed_and_sparse_tools():
    fixed = Preference((("search", 0.3),), outcome=0.9, cost=0.7, latency=0.1)
    got = sample_preference(np.random.default_rng(), TOOLS, PreferenceDistribution(kind="fixed", fixed=fixed))
    np.testing.assert_allclose(got.vector(), [0.3, 0, 0, 0.9, 0.7, 0.1], rtol=1e-6)
    sparse = sample_preferences(200, TOOLS, PreferenceDistribution(tool_keep_prob=0.0), seed=1)
    assert all(p.tool_weight(t) == 0 for p in sparse for t in TOOLS)


def test_per_task_preference_is_stable():
    tid = f"task-{random.randint(0, 10**9)}"
    assert preference_for_task(tid, TOOLS, seed=3) == preference_for_task(tid, TOOLS, seed=3)
    assert preference_for_task(tid, TOOLS, seed=3) != preference_for_task(tid, TOOLS, seed=4)


def test_bad_distribution():
    with pytest.raises(PreferenceError, match="kind='beta'"):
        PreferenceDistribution(kind="beta")
    with pytest.raises(PreferenceError, match="alpha"):
        PreferenceDistribution(kind="dirichlet", alpha=0.0)
