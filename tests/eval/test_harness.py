"""The evaluation harness over real episodes (scripted policy, real CPU-family tools): rows, resume, budget,
errors kept apart from wrong answers, a judge served on loopback, and summaries recomputed by hand."""

import asyncio
import itertools
import json
import math
import random
import re
import socket

import pytest
from fastapi import FastAPI, Request

from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.episode import EpisodeSetup
from orchestra_jax.env.judge import JudgeConfig
from orchestra_jax.env.llm_tools import ChatClient, Endpoint
from orchestra_jax.env.preferences import Preference
from orchestra_jax.env.prices import ModelPrice
from orchestra_jax.env.scripted import ScriptedEngine, turns_script
from orchestra_jax.env.search import BackgroundServer, BM25Index, LocalRetriever
from orchestra_jax.env.trajectory import EpisodeConfig, parse_request_id
from orchestra_jax.eval import baselines, benchmarks, harness
from orchestra_jax.eval.command import write_outputs
from orchestra_jax.eval.inputs import EvalUsageError, parse_preference
from orchestra_jax.eval.policies import OpenAIEngine, chatml_messages
from orchestra_jax.eval.results import ExampleResult, ResultsFile, pass_hat_k, summarize
from orchestra_jax.models import chat_template

CALL = tasks_cpu.tool_call_text


def run(coro, client=None):
    """Run `coro` in a fresh event loop; close `client`'s connections in that loop."""

    async def main():
        try:
            return await coro
        finally:
            if client is not None:
                await client.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def world():
    return tasks_cpu.make_world(seed=random.randrange(10**6), n_towns=30)


@pytest.fixture(scope="module")
def toolset(world):
    return baselines.cpu_tools(world)


@pytest.fixture(scope="module")
def tokenizer(world, toolset):
    tasks = tasks_cpu.generate_tasks(8, seed=1, world=world)
    return tasks_cpu.family_tokenizer(world, toolset.catalog, tasks, 600)


def environment(engine, tokenizer, toolset, judge=None, prices=None):
    return harness.EvalEnvironment(
        engine=engine,
        tokenizer=tokenizer,
        episode=EpisodeConfig(max_new_tokens=64, system_prompt=toolset.system_prompt),
        setup=lambda task, rollout: EpisodeSetup(toolset.catalog),
        prices=prices or tasks_cpu.cpu_prices(),
        judge=judge or harness.reference_judge(JudgeConfig(methods=("exact", "normalized"))),
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_resume_and_hand_computed_summary(tmp_path, world, toolset, tokenizer):
    tasks = tasks_cpu.generate_tasks(6, seed=random.randrange(10**6), world=world)
    right = set(random.sample([t.id for t in tasks], 3))
    # right tasks: expert first, then the true answer; others answer wrong at once
    script = turns_script(
        {
            t.id: [CALL("expert", {"question": t.question}), CALL("answer", {"answer": t.answer})]
            if t.id in right
            else [CALL("answer", {"answer": "no idea"})]
            for t in tasks
        }
    )
    env = environment(ScriptedEngine(tokenizer, script), tokenizer, toolset)
    runs = [harness.RunSpec(f"p/t{n}", "p", n) for n in (1, 3)]
    store = ResultsFile(tmp_path / "results.jsonl")
    report = run(harness.run_harness(tasks, runs, env, store, harness.HarnessConfig(concurrency=4, progress=False)))
    assert (report.ran, report.skipped, report.errors, report.pending) == (12, 0, 0, 0)
    rows = {(r.run, r.id): r for r in store.read()}
    assert len(rows) == 12
    for t in tasks:
        # one turn is not enough to consult the expert and answer; three are
        assert not rows[("p/t1", t.id)].correct
        assert rows[("p/t3", t.id)].correct == (t.id in right)
        assert rows[("p/t3", t.id)].tool_calls == ({"expert": 1, "answer": 1} if t.id in right else {"answer": 1})
    # costs and latencies are the trajectories' ledgers
    trajectories = {(t["run"], t["task_id"]): t for t in read_jsonl(tmp_path / "trajectories.jsonl")}
    for key, row in rows.items():
        ledger = trajectories[key]["ledger"]
        assert row.cost_usd == pytest.approx(ledger["cost_usd"])
        assert row.latency_s == pytest.approx(ledger["tool_latency_s"] + ledger["policy_latency_s"])
        assert row.trajectory_id == trajectories[key]["trajectory_id"]
    expert_rows = [r for r in rows.values() if "expert" in r.tool_calls]
    assert expert_rows and all(r.cost_usd > 1e-5 for r in expert_rows)

    again = run(harness.run_harness(tasks, runs, env, store, harness.HarnessConfig(progress=False)))
    assert (again.ran, again.skipped) == (0, 12)

    summaries = write_outputs(tmp_path)
    for label in ("p/t1", "p/t3"):
        mine = [r for r in rows.values() if r.run == label]
        s = json.loads((tmp_path / "summary.json").read_text())[label]
        assert s == summaries[label]
        assert s["accuracy"] == pytest.approx(sum(r.correct for r in mine) / 6)
        assert s["cost_usd_total"] == pytest.approx(sum(r.cost_usd for r in mine))
        assert s["cost_usd_mean"] == pytest.approx(sum(r.cost_usd for r in mine) / 6)
        assert s["latency_s_mean"] == pytest.approx(sum(r.latency_s for r in mine) / 6)
        assert s["max_turns"] == int(label[-1])
    assert summaries["p/t3"]["accuracy"] == pytest.approx(len(right) / 6)
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "turns.png").stat().st_size > 0
    assert (tmp_path / "summary.md").read_text().count("| p/t") == 2


def test_killed_run_loses_no_finished_example(tmp_path, world, toolset, tokenizer):
    tasks = tasks_cpu.generate_tasks(8, seed=random.randrange(10**6), world=world)
    script = turns_script({t.id: [CALL("answer", {"answer": t.answer})] for t in tasks})
    env = environment(ScriptedEngine(tokenizer, script, delay_s=0.05), tokenizer, toolset)
    runs = [harness.RunSpec("r", "r", 2)]
    store = ResultsFile(tmp_path / "results.jsonl")

    async def killed():
        job = asyncio.create_task(harness.run_harness(tasks, runs, env, store, harness.HarnessConfig(2, progress=False)))
        while len(store.read()) < 3:
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    run(killed())
    first = {r.id for r in store.read()}
    assert 3 <= len(first) < 8
    report = run(harness.run_harness(tasks, runs, env, store, harness.HarnessConfig(2, progress=False)))
    assert report.skipped == len(first) and report.ran == 8 - len(first)
    rows = store.read()
    assert sorted(r.id for r in rows) == sorted(t.id for t in tasks) and all(r.correct for r in rows)


def test_budget_stops_cleanly(tmp_path, world, toolset, tokenizer):
    tasks = tasks_cpu.generate_tasks(10, seed=random.randrange(10**6), world=world)
    script = turns_script(
        {t.id: [CALL("expert", {"question": t.question}), CALL("answer", {"answer": t.answer})] for t in tasks}
    )
    env = environment(ScriptedEngine(tokenizer, script), tokenizer, toolset)
    store = ResultsFile(tmp_path / "results.jsonl")
    probe = run(harness._play(env, harness.RunSpec("probe", "probe", 3), tasks[0], harness.ToolPool()))[0]
    budget = probe.cost_usd * random.uniform(2.2, 3.8)
    config = harness.HarnessConfig(concurrency=1, budget_usd=budget, progress=False)
    report = run(harness.run_harness(tasks, [harness.RunSpec("b", "b", 3)], env, store, config))
    rows = store.read()
    assert report.stopped == "budget" and report.pending == 10 - len(rows) > 0
    assert report.ran == len(rows) and report.spent_usd == pytest.approx(sum(r.cost_usd for r in rows))
    assert sum(r.cost_usd for r in rows[:-1]) < budget <= sum(r.cost_usd for r in rows)
    # a rerun with the same budget starts nothing: the earlier spend counts
    rerun = run(harness.run_harness(tasks, [harness.RunSpec("b", "b", 3)], env, store, config))
    assert rerun.ran == 0 and rerun.stopped == "budget"


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_policy_is_an_error_not_a_wrong_answer(tmp_path, world, toolset, tokenizer):
    tasks = tasks_cpu.generate_tasks(3, seed=random.randrange(10**6), world=world)
    dead = OpenAIEngine(f"http://127.0.0.1:{_closed_port()}", "m", tokenizer, max_attempts=2, backoff_s=0.01)
    store = ResultsFile(tmp_path / "results.jsonl")
    runs = [harness.RunSpec("r", "r", 2)]
    report = run(harness.run_harness(tasks, runs, environment(dead, tokenizer, toolset), store, harness.HarnessConfig(progress=False)))
    rows = store.read()
    assert report.errors == 3 and all(r.status == "error" and "unreachable after 2 attempts" in r.error for r in rows)
    s = summarize(rows)
    assert (s["scored"], s["errors"], s["accuracy"]) == (0, 3, 0.0)
    # the rerun retries the errors with a working policy; the summary keeps each example's last row
    script = turns_script({t.id: [CALL("answer", {"answer": t.answer})] for t in tasks})
    env = environment(ScriptedEngine(tokenizer, script), tokenizer, toolset)
    again = run(harness.run_harness(tasks, runs, env, store, harness.HarnessConfig(progress=False)))
    assert (again.ran, again.errors) == (3, 0)
    latest = harness.summaries_by_run(store.read())["r"]
    assert len(latest) == 3 and summarize(latest)["accuracy"] == 1.0


def judge_app():
    """An OpenAI-compatible judge: right when the student answer contains the reference; 'GARBLE' gets an
    unparseable reply. Speaks both ToolOrchestra's <correct> format and HLE's 'correct: yes|no'."""
    app = FastAPI()
    app.state.prompts = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        app.state.prompts.append(prompt)
        if "[correct_answer]" in prompt:
            student = re.search(r"\[response\]: (.*?)\n\n", prompt, re.S).group(1)
            reference = re.search(r"\[correct_answer\]: (.*?)\n\n", prompt, re.S).group(1)
            verdict = f"correct: {'yes' if reference.lower() in student.lower() else 'no'}"
        else:
            student = re.search(r"Student answer: (.*?)\n\n", prompt, re.S).group(1)
            reference = re.search(r"Reference answer: (.*?)\n\n", prompt, re.S).group(1)
            verdict = f"<correct>{reference.lower() in student.lower()}</correct>"
        text = "I cannot tell." if "GARBLE" in student else f"reasoning...\n{verdict}"
        usage = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
        message = {"role": "assistant", "content": text}
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}  # fmt: skip

    return app


@pytest.mark.parametrize("bench", ["frames", "hle"])
def test_frames_and_hle_with_a_local_judge(tmp_path, shared_data, tokenizer, bench):
    if bench == "frames":
        examples = benchmarks.load_frames(shared_data / "frames" / "frames.jsonl")[:6]
    else:
        examples = benchmarks.load_hle(shared_data / "hle" / "hle_20.jsonl")[:6]
    tasks = [harness.example_task(e) for e in examples]
    kinds = ["para", "wrong", "garble", random.choice(["para", "wrong"]), "para", "exact"]
    replies = {"para": "It is {a} indeed.", "wrong": "Zzyzx.", "garble": "GARBLE {a}", "exact": "{a}"}
    script = turns_script({t.id: [replies[k].format(a=t.answer)] for t, k in zip(tasks, kinds)})
    toolset = baselines.no_tools()
    prices = tasks_cpu.cpu_prices().with_models({"judge": ModelPrice(1.0, 2.0)})
    app = judge_app()
    with BackgroundServer(app) as server:
        client = ChatClient({"judge": Endpoint("judge", server.url + "/v1", "stub-judge", max_retries=0)})
        prompt = "hle" if bench == "hle" else "toolorchestra"
        judge = harness.reference_judge(JudgeConfig(backend="judge", prompt=prompt), client, prices)
        env = environment(ScriptedEngine(tokenizer, script), tokenizer, toolset, judge, prices)
        store = ResultsFile(tmp_path / "results.jsonl")
        config = harness.HarnessConfig(progress=False)
        run(harness.run_harness(tasks, [harness.RunSpec("j", "j", 2)], env, store, config), client)
    rows = {r.id: r for r in store.read()}
    judge_cost = (100 * 1.0 + 10 * 2.0) / 1e6
    for task, kind in zip(tasks, kinds):
        row = rows[task.id]
        assert row.status == "ok" and row.finish_reason == "final_text"
        assert row.correct == (kind in ("para", "exact"))
        assert row.judge_method == ("exact" if kind == "exact" else "llm")
        assert (row.judge_error is not None) == (kind == "garble")
        assert row.judge_cost_usd == pytest.approx(0.0 if kind == "exact" else judge_cost)
        assert row.cost_usd > 0  # the policy's own tokens, booked apart from the judge
    assert len(app.state.prompts) == 5 and all(("[correct_answer]" in p) == (bench == "hle") for p in app.state.prompts)
    s = summarize(store.read())
    assert s["judge_errors"] == 1 and s["judge_cost_usd_total"] == pytest.approx(5 * judge_cost)
    assert s["accuracy"] == pytest.approx(sum(k in ("para", "exact") for k in kinds) / 6)


def test_chatml_messages_round_trip():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    text = chat_template.render(messages, None, add_generation_prompt=True, enable_thinking=False)
    assert chatml_messages(text) == messages


def test_pass_hat_k_by_enumeration():
    n = random.randint(2, 5)
    outcomes = {f"ex{i}": [random.random() < 0.6 for _ in range(n)] for i in range(7)}
    rows = [
        ExampleResult(id=i, correct=c, cost_usd=0.0, latency_s=0.0, turns=1, trial=t)
        for i, trials in outcomes.items()
        for t, c in enumerate(trials)
    ]
    rows.append(ExampleResult(id="broken", correct=True, cost_usd=0.0, latency_s=0.0, turns=1, status="error"))
    got = pass_hat_k(rows)
    assert sorted(got) == list(range(1, n + 1))
    for k in range(1, n + 1):
        # all k-subsets of each example's trials: the share whose trials all succeeded
        by_hand = [
            sum(all(c) for c in itertools.combinations(trials, k)) / math.comb(n, k) for trials in outcomes.values()
        ]
        assert got[k] == pytest.approx(sum(by_hand) / len(by_hand))
    assert got[1] == pytest.approx(sum(map(sum, outcomes.values())) / (7 * n))


def test_trials_give_pass_hat_k(tmp_path, world, toolset, tokenizer):
    tasks = tasks_cpu.generate_tasks(3, seed=random.randrange(10**6), world=world)
    wins = {(t.id, trial): random.random() < 0.5 for t in tasks for trial in range(3)}

    def script(prompt_ids, rid):
        task_id, _, trial, _ = parse_request_id(rid)
        task = next(t for t in tasks if t.id == task_id)
        return CALL("answer", {"answer": task.answer if wins[(task_id, trial)] else "wrong"})

    env = environment(ScriptedEngine(tokenizer, script), tokenizer, toolset)
    store = ResultsFile(tmp_path / "results.jsonl")
    config = harness.HarnessConfig(concurrency=3, progress=False, trials=3)
    report = run(harness.run_harness(tasks, [harness.RunSpec("k", "k", 2)], env, store, config))
    assert report.ran == 9
    rows = store.read()
    assert {(r.id, r.trial): r.correct for r in rows} == wins
    assert len({r.trajectory_id for r in rows}) == 9
    summary = write_outputs(tmp_path)["k"]
    assert summary["pass_hat_k"] == pytest.approx(pass_hat_k(rows))
    assert summary["pass_hat_k"][3] == pytest.approx(sum(all(wins[(t.id, i)] for i in range(3)) for t in tasks) / 3)
    assert "pass^k" in (tmp_path / "summary.md").read_text()


def test_unreachable_judge_is_an_error(tmp_path, tokenizer):
    task = harness.example_task(benchmarks.EvalExample("q1", "Who wrote it?", "Ann Smith"))
    script = turns_script({"q1": ["Probably Ann."]})
    client = ChatClient({"judge": Endpoint("judge", f"http://127.0.0.1:{_closed_port()}/v1", "j", max_retries=1)})
    prices = tasks_cpu.cpu_prices().with_models({"judge": ModelPrice(1.0, 2.0)})
    judge = harness.reference_judge(JudgeConfig(backend="judge"), client, prices)
    env = environment(ScriptedEngine(tokenizer, script), tokenizer, baselines.no_tools(), judge, prices)
    store = ResultsFile(tmp_path / "results.jsonl")
    run(harness.run_harness([task], [harness.RunSpec("j", "j", 1)], env, store, harness.HarnessConfig(progress=False)), client)
    (row,) = store.read()
    assert row.status == "error" and row.error.startswith("judge: endpoint 'judge' unreachable")


def test_baseline_toolsets_are_the_seed_table_rows(world, tokenizer, tmp_path):
    assert baselines.no_tools().catalog.names == ()
    retriever = LocalRetriever(BM25Index.build(world.passages()))
    basic = baselines.build_toolset("basic", retriever=retriever)
    assert basic.catalog.names == ("search", "python") and basic.mode == "history"
    assert baselines.build_toolset("basic").catalog.names == ("python",)
    with pytest.raises(baselines.ToolsetError, match="needs model endpoints"):
        baselines.build_toolset("orchestrator")
    client = ChatClient({"m": Endpoint("m", "http://127.0.0.1:9/v1", "m")})
    orchestrator = baselines.build_toolset("orchestrator", client=client, retriever=retriever)
    assert orchestrator.catalog.names == ("enhance_reasoning", "answer", "search") and orchestrator.mode == "context"
    # the basic row really runs code: a scripted model computes with Python, then answers in text
    a, b = random.randrange(100, 999), random.randrange(100, 999)
    task = harness.example_task(benchmarks.EvalExample("m1", f"What is {a} * {b}?", str(a * b)))
    script = turns_script({"m1": [CALL("python", {"code": f"print({a} * {b})"}), f"<answer>{a * b}</answer>"]})
    env = environment(ScriptedEngine(tokenizer, script), tokenizer, basic)
    store = ResultsFile(tmp_path / "results.jsonl")
    run(harness.run_harness([task], [harness.RunSpec("b", "b", 3)], env, store, harness.HarnessConfig(progress=False)))
    (row,) = store.read()
    assert row.correct and row.tool_calls == {"python": 1} and row.judge_method == "exact" and row.cost_usd > 0


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("cost", Preference(outcome=1.0, cost=1.0)),
        ("outcome=0.5,latency=0.25,tool.search=1", Preference((("search", 1.0),), 0.5, 0.0, 0.25)),
        ("task", None),
    ],
)
def test_preference_specs(spec, expected):
    assert parse_preference(spec) == expected


@pytest.mark.parametrize("spec", ["cost=2", "speed=1", "outcome", "cost=abc"])
def test_bad_preference_specs(spec):
    with pytest.raises(EvalUsageError, match="--preference"):
        parse_preference(spec)
