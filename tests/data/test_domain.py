"""The generic domain environment: data model checks, declarative tools, τ²-style scoring, folders on disk."""

import json
import random

import pytest

from orchestra_jax.env import domain as dl
from orchestra_jax.env.domain import Action, Domain, DomainEnv, DomainTask


def shop(rng: random.Random) -> Domain:
    """A two-table domain with random contents."""
    data_model = {"tables": {
        "users": {"key": "user_id", "key_prefix": "US", "description": "customers", "fields": {
            "user_id": {"type": "string", "description": "id"},
            "email": {"type": "string", "description": "email", "unique": True}}},
        "orders": {"key": "order_id", "key_prefix": "OR", "description": "orders", "fields": {
            "order_id": {"type": "string", "description": "id"},
            "user_id": {"type": "string", "description": "owner", "ref": "users"},
            "total": {"type": "number", "description": "total", "minimum": 0},
            "status": {"type": "string", "description": "status", "enum": ["open", "cancelled"]}}}}}
    users = {f"US{i:04d}": {"user_id": f"US{i:04d}", "email": f"u{i}-{rng.randint(0, 999)}@x.org"} for i in range(1, 4)}
    orders = {f"OR{i:04d}": {"order_id": f"OR{i:04d}", "user_id": rng.choice(sorted(users)),
                             "total": round(rng.uniform(1, 100), 2), "status": "open"} for i in range(1, 6)}
    tools = [
        {"name": "find_user", "description": "by email", "kind": "search", "table": "users",
         "parameters": {"email": {"type": "string"}}, "match": {"email": "email"}},
        {"name": "get_order", "description": "read", "kind": "read", "table": "orders",
         "parameters": {"order_id": {"type": "string"}}, "key_param": "order_id", "returns": ["order_id", "total"]},
        {"name": "cancel_order", "description": "cancel", "kind": "update", "table": "orders",
         "parameters": {"order_id": {"type": "string"}}, "key_param": "order_id",
         "preconditions": [{"field": "status", "op": "eq", "value": "open"}],
         "effects": [{"field": "status", "value": "cancelled"}]},
        {"name": "refund", "description": "partial refund", "kind": "update", "table": "orders",
         "parameters": {"order_id": {"type": "string"}, "amount": {"type": "number"}}, "key_param": "order_id",
         "effects": [{"field": "total", "add_param": "amount", "sign": -1}]},
        {"name": "new_order", "description": "create", "kind": "create", "table": "orders",
         "parameters": {"user_id": {"type": "string"}, "total": {"type": "number"}},
         "effects": [{"field": "user_id", "param": "user_id"}, {"field": "total", "param": "total"},
                     {"field": "status", "value": "open"}]},
    ]
    return Domain("shop", data_model, tuple(dl.tool_from_dict(t) for t in tools), "be nice", {"users": users, "orders": orders})


@pytest.fixture
def rng():
    return random.Random()


def test_valid_domain_has_no_errors(rng):
    d = shop(rng)
    assert dl.check_data_model(d.data_model) == []
    assert dl.check_database(d.data_model, d.db) == []
    assert [e for t in d.tools for e in dl.check_tool(d.data_model, t)] == []


def test_database_errors_name_the_record(rng):
    d = shop(rng)
    bad = json.loads(json.dumps(d.db))
    bad["orders"]["OR0001"]["user_id"] = "US9999"
    bad["orders"]["OR0002"]["total"] = -1
    bad["users"]["US0002"]["email"] = bad["users"]["US0001"]["email"]
    errors = dl.check_database(d.data_model, bad)
    assert any("orders/OR0001.user_id" in e and "US9999" in e for e in errors)
    assert any("orders/OR0002.total" in e for e in errors)
    assert any("not unique" in e for e in errors)


def test_bad_data_model_and_tool_are_reported():
    assert dl.check_data_model({"tables": {"t": {"key": "x", "fields": {"y": {"type": "date"}}}}})
    d = shop(random.Random(0))
    broken = dl.tool_from_dict({"name": "b", "description": "", "kind": "update", "table": "orders",
                                "parameters": {}, "key_param": "nope", "effects": [{"field": "zzz", "value": 1}]})
    errors = dl.check_tool(d.data_model, broken)
    assert any("key_param" in e for e in errors) and any("zzz" in e for e in errors)


def test_tools_execute_without_mutating_their_input(rng):
    d = shop(rng)
    before = json.dumps(d.db, sort_keys=True)
    key = rng.choice(sorted(d.db["orders"]))
    out = dl.execute(d.data_model, d.tool_map, d.db, "cancel_order", {"order_id": key})
    assert out.error is None and out.db["orders"][key]["status"] == "cancelled"
    assert json.dumps(d.db, sort_keys=True) == before
    again = dl.execute(d.data_model, d.tool_map, out.db, "cancel_order", {"order_id": key})
    assert again.error and "precondition" in again.error and again.db is out.db
    read = json.loads(dl.execute(d.data_model, d.tool_map, d.db, "get_order", {"order_id": key}).observation)
    assert set(read) == {"order_id", "total"}
    email = d.db["users"]["US0002"]["email"]
    hits = json.loads(dl.execute(d.data_model, d.tool_map, d.db, "find_user", {"email": email}).observation)
    assert [h["user_id"] for h in hits] == ["US0002"]


def test_effects_that_break_the_data_model_fail(rng):
    d = shop(rng)
    key = rng.choice(sorted(d.db["orders"]))
    total = d.db["orders"][key]["total"]
    ok = dl.execute(d.data_model, d.tool_map, d.db, "refund", {"order_id": key, "amount": total / 2})
    assert ok.error is None and ok.db["orders"][key]["total"] == pytest.approx(total - total / 2, abs=0.01)
    too_much = dl.execute(d.data_model, d.tool_map, d.db, "refund", {"order_id": key, "amount": total + 1})
    assert too_much.error and "minimum" in too_much.error
    created = dl.execute(d.data_model, d.tool_map, d.db, "new_order", {"user_id": "US9999", "total": 3.0})
    assert created.error and "US9999" in created.error


@pytest.mark.parametrize("arguments", [{}, {"order_id": 5}, {"order_id": "OR0001", "extra": 1}, "not a dict"])
def test_bad_arguments_are_errors_not_exceptions(arguments):
    d = shop(random.Random(1))
    out = dl.execute(d.data_model, d.tool_map, d.db, "cancel_order", arguments)
    assert out.error and out.observation.startswith("Error:") and out.db is d.db
    assert dl.execute(d.data_model, d.tool_map, d.db, "no_such_tool", {}).error


def test_create_generates_a_fresh_key(rng):
    d = shop(rng)
    out = dl.execute(d.data_model, d.tool_map, d.db, "new_order", {"user_id": "US0001", "total": 9.5})
    new = set(out.db["orders"]) - set(d.db["orders"])
    assert len(new) == 1 and json.loads(out.observation)["order_id"] in new


def test_scoring_follows_tau2(rng):
    d = shop(rng)
    key = rng.choice(sorted(d.db["orders"]))
    task = DomainTask("t1", {"reason_for_call": "cancel"}, (Action("cancel_order", {"order_id": key}),),
                      communicate_info=("cancelled",))
    env = DomainEnv(d, task)
    env.call("get_order", {"order_id": key})
    env.call("cancel_order", {"order_id": key})
    assert env.score(["Your order is Cancelled."]).reward == 1.0
    assert env.score(["done"]).reward == 0.0  # information not communicated
    other = next(k for k in sorted(d.db["orders"]) if k != key)
    wrong = DomainEnv(d, task)
    wrong.call("cancel_order", {"order_id": other})
    score = wrong.score(["cancelled"])
    assert score.reward == 0.0 and not score.db_match and not score.actions_ok


def test_domain_folder_round_trip_and_errors(tmp_path, rng):
    d = shop(rng)
    task = DomainTask("t1", {"reason_for_call": "x"}, (Action("cancel_order", {"order_id": "OR0001"}),))
    dl.save_domain(d, tmp_path / "shop", [dl.task_to_dict(task, "shop")])
    loaded = dl.load_domain(tmp_path / "shop")
    assert loaded.db == d.db and loaded.tools == d.tools and loaded.policy == d.policy
    assert dl.load_domain_tasks(tmp_path / "shop") == [task]
    (tmp_path / "shop" / "db.json").write_text('{"users": {}, "orders": {"O": 1}}')
    with pytest.raises(dl.DomainError, match="orders/O"):
        dl.load_domain(tmp_path / "shop")
    (tmp_path / "shop" / "db.json").write_text('{"users": \n{')
    with pytest.raises(dl.DomainError, match=r"db.json:2: invalid JSON"):
        dl.load_domain(tmp_path / "shop")


JUNK = [None, [], {}, 1, -2.5, True, "x", ["a"], [{}], {"a": []}]


def _mutate(value, rng: random.Random):
    """Replace one random nested value by junk (LLM-written specs can put anything anywhere)."""
    value = json.loads(json.dumps(value))
    node = value
    for _ in range(rng.randint(0, 4)):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        children = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = rng.choice(children)[1]
    if isinstance(node, dict) and node:
        node[rng.choice(sorted(node))] = rng.choice(JUNK)
    elif isinstance(node, list) and node:
        node[rng.randrange(len(node))] = rng.choice(JUNK)
    return value


def test_malformed_specs_give_errors_never_exceptions():
    rng = random.Random()
    d = shop(rng)
    raw_tools = [t.to_dict() for t in d.tools]
    for _ in range(300):
        model = _mutate(d.data_model, rng)
        assert isinstance(dl.check_data_model(model), list)
        if not dl.check_data_model(model):
            assert isinstance(dl.check_database(model, _mutate(d.db, rng)), list)
        raw = _mutate(rng.choice(raw_tools), rng)
        try:
            tool = dl.tool_from_dict(raw)
        except dl.DomainError:
            continue
        errors = dl.check_tool(d.data_model, tool)
        if not errors:  # a spec that checks out must also execute without raising
            dl.execute(d.data_model, {tool.name: tool}, d.db, tool.name, {p: "OR0001" for p in tool.parameters})
