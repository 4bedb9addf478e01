"""Episodes driven by a scripted policy over the real engine interface, with real tools (sandbox, BM25)."""

import asyncio
import json
import random
import re

import pytest

from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.catalog import Tool, ToolCatalog, ToolResult
from orchestra_jax.env.episode import ToolPool, run_episode, run_episodes
from orchestra_jax.env.preferences import Preference, render_instruction
from orchestra_jax.env.prices import PriceTable
from orchestra_jax.env.scripted import ScriptedEngine, turns_script
from orchestra_jax.env.trajectory import EpisodeConfig, Task, Trajectory, parse_request_id, request_id
from orchestra_jax.models import chat_template

CALL = tasks_cpu.tool_call_text
PRICE_IN, PRICE_OUT = 0.7, 1.9


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def world():
    return tasks_cpu.make_world(seed=random.randrange(10**6), n_towns=40)


@pytest.fixture(scope="module")
def catalog(world):
    return tasks_cpu.cpu_catalog(world)


@pytest.fixture(scope="module")
def tokenizer(world, catalog):
    tasks = tasks_cpu.generate_tasks(16, seed=1, world=world)
    return tasks_cpu.family_tokenizer(world, catalog, tasks, 700)


def config(**kw):
    base = dict(
        max_turns=4,
        policy_model="test-policy",
        policy_price_in=PRICE_IN,
        policy_price_out=PRICE_OUT,
        system_prompt=tasks_cpu.SYSTEM_PROMPT,
    )
    return EpisodeConfig(**{**base, **kw})


def arith_task(task_id="t0", pref=None):
    a, b = random.randrange(100, 999), random.randrange(11, 99)
    return Task(
        task_id,
        f"What is {a} * {b}?",
        str(a * b),
        tasks_cpu.TOOL_NAMES,
        pref or Preference(cost=0.5),
        {"kind": "arith", "expression": f"{a}*{b}"},
    )


def logprob(rid, i, token):
    _, _, _, turn = parse_request_id(rid)
    return -0.01 * (i + 1) - turn


def test_request_ids_round_trip():
    rid = request_id("cpu-3-7#x", 5, 2, 9)
    assert parse_request_id(rid) == ("cpu-3-7#x", 5, 2, 9)
    with pytest.raises(ValueError):
        parse_request_id("no-structure")


def test_history_episode_token_exact_with_real_sandbox_and_ledger(tokenizer, catalog):
    task = arith_task()
    turns = [
        CALL("python", {"code": f"print({task.metadata['expression']})"}),
        CALL("answer", {"answer": task.answer}),
    ]
    engine = ScriptedEngine(
        tokenizer, turns_script({task.id: turns}), logprob_fn=logprob, weight_version="v7"
    )
    prices = tasks_cpu.cpu_prices()
    traj = run(run_episode(engine, tokenizer, catalog, task, config(), prices=prices))

    assert (
        traj.correct and traj.answer == task.answer and traj.finish_reason == "answer" and traj.error is None
    )
    assert len(engine.requests) == 2
    system = tasks_cpu.SYSTEM_PROMPT + "\n\n" + render_instruction(task.preference)
    prompt0 = tokenizer.encode(
        chat_template.render(
            [{"role": "system", "content": system}, {"role": "user", "content": task.question}],
            catalog.schemas(),
            add_generation_prompt=True,
            enable_thinking=False,
        )
    )
    assert list(engine.requests[0].prompt_ids) == prompt0
    end = tokenizer.token_id("<|im_end|>")
    out0 = tokenizer.encode(turns[0]) + [end]
    out1 = tokenizer.encode(turns[1]) + [end]
    response = (
        f"<|im_start|>user\n<tool_response>\n{task.answer}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    prompt1 = prompt0 + out0 + tokenizer.encode("\n") + tokenizer.encode(response)
    assert list(engine.requests[1].prompt_ids) == prompt1
    assert list(traj.token_ids) == prompt1 + out1 + tokenizer.encode("\n")

    mask = [0] * len(traj.token_ids)
    for start, out in ((len(prompt0), out0), (len(prompt1), out1)):
        mask[start : start + len(out)] = [1] * len(out)
    assert list(traj.loss_mask) == mask
    expected_lp = [0.0] * len(mask)
    for turn, (start, out) in enumerate(((len(prompt0), out0), (len(prompt1), out1))):
        expected_lp[start : start + len(out)] = [-0.01 * (i + 1) - turn for i in range(len(out))]
    assert traj.behaviour_logprobs == pytest.approx(expected_lp)
    assert traj.weight_version == "v7" and traj.samples[0].weight_version == "v7"
    spans = ((len(prompt0), len(prompt0) + len(out0)), (len(prompt1), len(prompt1) + len(out1)))
    assert traj.samples[0].turn_spans == spans and traj.samples[0].turn_indices == (0, 1)

    ledger = traj.ledger
    policy_cost = (PRICE_IN * (len(prompt0) + len(prompt1)) + PRICE_OUT * (len(out0) + len(out1))) / 1e6
    assert ledger.prompt_tokens == {"test-policy": len(prompt0) + len(prompt1)}
    assert ledger.completion_tokens == {"test-policy": len(out0) + len(out1)}
    assert ledger.sandbox_s > 0
    assert ledger.cost_usd == pytest.approx(
        policy_cost + ledger.sandbox_s * prices.sandbox_usd_per_second, rel=1e-9
    )
    assert traj.tool_counts == {"python": 1, "search": 0, "expert": 0, "answer": 1}
    assert ledger.tool_latency_s > 0 and ledger.policy_latency_s >= 0
    assert traj.preference == pytest.approx(tuple(task.preference.vector(tasks_cpu.TOOL_NAMES)))
    assert traj.format_errors == 0 and traj.malformed_turns == (False, False)
    again = Trajectory.from_json(json.loads(json.dumps(traj.to_json())))
    assert again == traj


def test_malformed_calls_are_error_observations_with_format_flags(tokenizer, catalog):
    task = arith_task()
    turns = [
        '<tool_call>\n{"name": "python", "arguments": }\n</tool_call>',
        CALL("calculator", {"x": 1}),
        CALL("python", {"code": 5}),
        "".join(CALL("expert", {"question": task.question}) for _ in range(5)),
    ]
    engine = ScriptedEngine(tokenizer, turns_script({task.id: turns}))
    traj = run(
        run_episode(
            engine, tokenizer, catalog, task, config(max_turns=4, max_calls_per_turn=4, max_new_tokens=2048)
        )
    )
    assert traj.malformed_turns == (True, True, True, True) and traj.format_errors == 4
    assert (
        not traj.correct and traj.answer is None and traj.finish_reason == "max_turns" and traj.error is None
    )
    errors = [t.observations[-1] for t in traj.turns]
    assert all(e.startswith("Error:") for e in errors)
    assert (
        "unknown tool 'calculator'" in errors[1]
        and "'code'" in errors[2]
        and "too many tool calls" in errors[3]
    )
    assert (
        traj.tool_counts["expert"] == 4 and traj.tool_counts["python"] == 0
    )  # the first four calls still ran
    assert len(engine.requests) == 4


def test_tool_that_raises_or_times_out_is_an_observation_not_a_format_error(tokenizer):
    async def boom(arguments, context):
        raise RuntimeError("disk on fire")

    async def slow(arguments, context):
        await asyncio.sleep(30)
        return ToolResult("late")

    empty = {"type": "object", "properties": {}}
    catalog = ToolCatalog(
        (
            Tool("boom", "raises", empty, boom),
            Tool("slow", "hangs", empty, slow, timeout_s=0.2),
            tasks_cpu.make_answer_tool(),
        )
    )
    task = Task("t1", "Say 7.", "7")
    turns = [CALL("boom", {}) + CALL("slow", {}), CALL("answer", {"answer": "7"})]
    traj = run(
        run_episode(
            ScriptedEngine(tokenizer, turns_script({task.id: turns})), tokenizer, catalog, task, config()
        )
    )
    first = traj.turns[0].observations
    assert "disk on fire" in first[0] and "timed out" in first[1]
    assert traj.malformed_turns == (False, False) and traj.correct
    assert traj.tool_counts == {"boom": 1, "slow": 1, "answer": 1}
    assert traj.ledger.tool_latency_s >= 0.2


def test_engine_failure_fails_one_episode_not_the_batch(tokenizer, catalog, world):
    tasks = tasks_cpu.generate_tasks(6, seed=random.randrange(1000), world=world, kinds=("fact",))
    doomed = tasks[2].id

    def script(prompt_ids, rid):
        task_id, _, _, turn = parse_request_id(rid)
        if task_id == doomed:
            raise RuntimeError("GPU fell over")
        task = next(t for t in tasks if t.id == task_id)
        return (
            CALL("expert", {"question": task.question})
            if turn == 0
            else CALL("answer", {"answer": task.answer})
        )

    trajs = run(run_episodes(ScriptedEngine(tokenizer, script), tokenizer, catalog, tasks, config()))
    assert [t.task_id for t in trajs] == [t.id for t in tasks]
    bad = trajs[2]
    assert bad.finish_reason == "engine_error" and "GPU fell over" in bad.error and not bad.correct
    assert all(t.correct and t.error is None for i, t in enumerate(trajs) if i != 2)


def test_final_text_and_user_dialogue(tokenizer, catalog):
    task = Task("t2", "What colour is the sky?", "blue")
    engine = ScriptedEngine(tokenizer, turns_script({task.id: ["Blue"]}))
    traj = run(run_episode(engine, tokenizer, catalog, task, config()))
    assert traj.finish_reason == "final_text" and traj.answer == "Blue" and traj.correct

    class User:
        def __init__(self):
            self.heard = []

        async def reply(self, text):
            self.heard.append(text)
            return None if len(self.heard) == 2 else "and the grass?"

    user = User()
    engine = ScriptedEngine(tokenizer, turns_script({task.id: ["Blue", "Green"]}))
    traj = run(run_episode(engine, tokenizer, catalog, task, config(), user=user, grader=_const(True)))
    assert user.heard == ["Blue", "Green"] and traj.finish_reason == "user_stop" and traj.correct
    second_prompt = tokenizer.decode(engine.requests[1].prompt_ids)
    assert second_prompt.endswith(
        "<|im_start|>user\nand the grass?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    user_ids = tokenizer.encode("and the grass?")
    ids, mask = list(traj.token_ids), list(traj.loss_mask)
    at = next(i for i in range(len(ids)) if ids[i : i + len(user_ids)] == user_ids)
    assert set(mask[at : at + len(user_ids)]) == {0}


def _const(value):
    async def grader(answer):
        return value

    return grader


def test_context_mode_rebuilds_the_prompt_and_makes_one_sample_per_turn(tokenizer, catalog, world):
    (task,) = tasks_cpu.generate_tasks(1, seed=random.randrange(1000), world=world, kinds=("fact",))
    turns = [tasks_cpu.first_call(task, "search"), CALL("answer", {"answer": task.answer})]
    engine = ScriptedEngine(tokenizer, turns_script({task.id: turns}))
    traj = run(run_episode(engine, tokenizer, catalog, task, config(mode="context")))
    assert traj.correct and len(traj.samples) == 2
    first, second = (tokenizer.decode(r.prompt_ids) for r in engine.requests)
    assert "Documents:" not in first and f"Problem: {task.question}" in first
    town = world.town(task.metadata["town"])
    assert f"Doc 1: {town.name}\n{town.passage()}" in second
    for sample, request in zip(traj.samples, engine.requests, strict=True):
        n = len(request.prompt_ids)
        assert sample.token_ids[:n] == request.prompt_ids and set(sample.loss_mask[:n]) == {0}
        assert sum(sample.loss_mask) > 0
    assert traj.ledger.search_queries == 1
    assert traj.ledger.cost_usd > tasks_cpu.SEARCH_FEE_USD


def test_64_concurrent_episodes_in_flight_without_deadlock(tokenizer, catalog, world):
    tasks = tasks_cpu.generate_tasks(64, seed=random.randrange(1000), world=world)
    by_id = {t.id: t for t in tasks}

    def script(prompt_ids, rid):
        task_id, _, _, turn = parse_request_id(rid)
        task = by_id[task_id]
        if task.metadata["kind"] == "fact":
            tool = "search"
        else:  # every fourth task runs real sandboxed code
            tool = "python" if int(task_id.rsplit("-", 1)[1]) % 4 == 0 else "expert"
        return tasks_cpu.first_call(task, tool) if turn == 0 else CALL("answer", {"answer": task.answer})

    engine = ScriptedEngine(tokenizer, script, delay_s=0.05)
    pool = ToolPool(workers=8)
    trajs = run(
        asyncio.wait_for(
            run_episodes(engine, tokenizer, catalog, tasks, config(), concurrency=64, pool=pool), 120
        )
    )
    assert engine.max_in_flight == 64
    assert all(t.correct for t in trajs) and pool.calls == 128 and pool.peak == 8
    assert sum(t.tool_counts["python"] for t in trajs) == 16


def test_a_call_cancelled_while_queued_is_closed_unstarted():
    """A run cancelled mid-rollout must not leave queued tool coroutines unawaited (they never start)."""
    pool = ToolPool(workers=1)
    started = []

    async def call(name):
        started.append(name)
        await asyncio.sleep(10)

    async def main():
        holder = asyncio.create_task(pool.run(call("first")))
        await asyncio.sleep(0)
        queued_call = call("queued")
        queued = asyncio.create_task(pool.run(queued_call))
        await asyncio.sleep(0.01)
        for task in (queued, holder):
            task.cancel()
        await asyncio.gather(holder, queued, return_exceptions=True)
        return queued_call

    queued_call = run(main())
    assert started == ["first"] and queued_call.cr_frame is None  # closed, never run
    assert pool.running == 0 and pool.calls == 1


def test_group_rollouts_share_a_group_id_and_differ_in_seed(tokenizer, catalog, world):
    tasks = tasks_cpu.generate_tasks(2, seed=3, world=world, kinds=("fact",))
    engine = ScriptedEngine(tokenizer, lambda ids, rid: "no idea")
    trajs = run(run_episodes(engine, tokenizer, catalog, tasks, config(seed=11), group_size=3))
    assert [t.group_id for t in trajs] == [0, 0, 0, 1, 1, 1]
    seeds = [r.sampling.seed for r in engine.requests]
    assert len(set(seeds)) == 6 and all(s is not None for s in seeds)
    assert all(not t.correct and t.finish_reason == "final_text" for t in trajs)


def test_prices_policy_tokens_from_table_when_present(tokenizer, catalog):
    task = Task("t3", "Say 1.", "1")
    engine = ScriptedEngine(tokenizer, turns_script({task.id: ["1"]}))
    table = PriceTable(models={"test-policy": tasks_cpu.ModelPrice(100.0, 0.0)})
    traj = run(run_episode(engine, tokenizer, catalog, task, config(), prices=table))
    assert traj.ledger.cost_usd == pytest.approx(100.0 * len(engine.requests[0].prompt_ids) / 1e6)


def test_bench_episodes_command_prints_rate_and_utilisation(capsys):
    from orchestra_jax import cli

    argv = ["bench", "episodes", "--episodes", "8", "--concurrency", "8", "--workers", "4", "--repeats", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rate = re.search(r"episodes/s: best ([\d.]+)", out)
    util = re.search(r"tool-pool utilisation: mean ([\d.]+)%", out)
    assert rate and float(rate.group(1)) > 0 and util and 0 < float(util.group(1)) <= 100
    assert "correct 8/8" in out
    assert cli.main(["bench", "episodes", "--workers", "0"]) == 2


def test_training_samples_drop_the_tokens_of_malformed_turns(tokenizer, catalog):
    task = arith_task()
    turns = [
        '<tool_call>{"name": "python"</tool_call>',
        CALL("expert", {"question": task.question}),
        CALL("answer", {"answer": task.answer}),
    ]
    engine = ScriptedEngine(tokenizer, turns_script({task.id: turns}))
    for mode in ("history", "context"):
        traj = run(run_episode(engine, tokenizer, catalog, task, config(mode=mode)))
        assert traj.correct and traj.malformed_turns == (True, False, False)
        kept = traj.training_samples()
        spans = [
            (sample, span, turn)
            for sample in traj.samples
            for span, turn in zip(sample.turn_spans, sample.turn_indices, strict=True)
        ]
        assert [turn for _, _, turn in spans] == [0, 1, 2]
        assert sum(map(sum, (s.loss_mask for s in kept))) == sum(
            end - start for _, (start, end), turn in spans if turn != 0
        )
        assert len(kept) == (1 if mode == "history" else 2)
        everything = traj.training_samples(drop_malformed_turns=False)
        assert [s.loss_mask for s in everything] == [s.loss_mask for s in traj.samples]
