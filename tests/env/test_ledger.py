import json
import random

import pytest

from orchestra_jax.env.ledger import (
    Ledger,
    PriceError,
    PriceTable,
    Usage,
    default_price_table,
    load_price_table,
)
from orchestra_jax.env.prices import ModelPrice


def test_toolorchestra_defaults_fix_the_10x_input_typos():
    table = default_price_table()
    assert table.price("gpt-5") == ModelPrice(1.25, 10.0)
    assert table.price("gpt-5-mini") == ModelPrice(0.25, 2.0)
    # one million prompt tokens of gpt-5 cost $1.25 (the released eval table charged $0.125)
    assert table.call_cost(Usage("gpt-5", 1_000_000, 0)) == pytest.approx(1.25)
    assert table.sandbox_usd_per_second == pytest.approx(8.3e-6)


def test_cost_arithmetic_against_hand_computed_values():
    rng = random.Random()
    table = default_price_table()
    p, c = rng.randint(1, 50_000), rng.randint(1, 20_000)
    q, d = rng.randint(1, 50_000), rng.randint(1, 20_000)
    secs = rng.uniform(0.1, 30.0)
    usage = [Usage("gpt-5", p, c), Usage("Qwen/Qwen3-8B", q, d)]
    expected = (1.25 * p + 10.0 * c) / 1e6 + (0.2 * q + 0.2 * d) / 1e6 + secs * 0.0000083 + 3 * 0.01
    got = table.cost(usage, sandbox_s=secs, search_queries=3, search_kind="web")
    assert got == pytest.approx(expected, rel=1e-12)
    # local search is free by default
    assert table.cost(search_queries=5, search_kind="local") == 0.0


def test_ledger_accumulates_immutably():
    table = default_price_table()
    n1, n2 = random.randint(100, 5000), random.randint(1, 500)
    start = Ledger()
    after_policy = start.charge(table, usage=[Usage("Qwen/Qwen3-8B", n1, n2)], policy_latency_s=1.5)
    after_tool = after_policy.charge(
        table,
        usage=[Usage("gpt-5-mini", 1000, 200)],
        tool="search",
        tool_latency_s=2.0,
        search_queries=1,
        search_kind="web",
    )
    assert start == Ledger()
    assert after_policy.cost_usd == pytest.approx(0.2 * (n1 + n2) / 1e6)
    assert after_tool.cost_usd == pytest.approx(
        0.2 * (n1 + n2) / 1e6 + (0.25 * 1000 + 2.0 * 200) / 1e6 + 0.01
    )
    assert after_tool.tool_latency_s == 2.0 and after_tool.policy_latency_s == 1.5
    assert after_tool.prompt_tokens == {"Qwen/Qwen3-8B": n1, "gpt-5-mini": 1000}
    assert after_tool.completion_tokens == {"Qwen/Qwen3-8B": n2, "gpt-5-mini": 200}
    assert after_tool.tool_calls == {"search": 1}
    again = after_tool.add(tool="search", tool_latency_s=0.5, judge_cost_usd=0.003)
    assert again.tool_calls == {"search": 2} and after_tool.tool_calls == {"search": 1}
    assert again.cost_usd == after_tool.cost_usd and again.judge_cost_usd == 0.003
    assert Ledger.from_json(json.loads(json.dumps(again.to_json()))) == again


def test_merge_is_sum():
    table = default_price_table()
    a = Ledger().charge(table, usage=[Usage("gpt-5", 10, 20)], tool="answer", tool_latency_s=1.0)
    b = Ledger().charge(
        table, usage=[Usage("gpt-5", 1, 2), Usage("Qwen/Qwen3-32B", 5, 5)], tool="answer", sandbox_s=3.0
    )
    m = a.merge(b)
    assert m.cost_usd == pytest.approx(a.cost_usd + b.cost_usd)
    assert m.tool_calls == {"answer": 2}
    assert m.prompt_tokens == {"gpt-5": 11, "Qwen/Qwen3-32B": 5}
    assert m.sandbox_s == 3.0


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(PriceError, match="no price for model 'nope'"):
        default_price_table().call_cost(Usage("nope", 1, 1))


def test_user_override_file(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "gpt-5": {"input_per_million": 2.0, "output_per_million": 3.0},
                    "local/tiny": {"input_per_million": 0.01, "output_per_million": 0.02},
                },
                "sandbox_usd_per_second": 0.001,
                "search_usd_per_query": {"local": 0.0005},
            }
        )
    )
    table = load_price_table(path)
    assert isinstance(table, PriceTable)
    assert table.price("gpt-5") == ModelPrice(2.0, 3.0)
    assert table.price("gpt-5-mini") == ModelPrice(0.25, 2.0)  # untouched default
    assert table.cost(
        [Usage("local/tiny", 1_000_000, 1_000_000)], sandbox_s=2, search_queries=2
    ) == pytest.approx(0.01 + 0.02 + 0.002 + 0.001)
    assert load_price_table(path, base=table).to_json() == table.to_json() | {}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ('{"models": {"x": {"input_per_million": -1, "output_per_million": 1}}}', "non-negative"),
        ('{"models": {"x": {"input_per_million": 1}}}', "expected"),
        ('{"modles": {}}', "unknown key 'modles'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_price_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PriceError, match=message) as info:
        load_price_table(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_call_that_used_nothing_costs_nothing_even_unpriced():
    assert default_price_table().call_cost(Usage("unpriced-backend", 0, 0)) == 0.0
