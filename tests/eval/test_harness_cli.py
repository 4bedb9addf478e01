"""`orchestra-jax eval` end to end: a tiny model served by `orchestra-jax serve` as policy and expert, BM25 over
the multihop corpus, a turn-limit sweep on a checkpoint, τ² gold replay, and bad input as one-line errors."""

import asyncio
import dataclasses
import json
import random
import socket
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from orchestra_jax import cli, models
from orchestra_jax import config as config_lib
from orchestra_jax.config import CheckpointConfig
from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.episode import EpisodeSetup
from orchestra_jax.env.judge import JudgeConfig
from orchestra_jax.env.llm_tools import ChatClient
from orchestra_jax.env.scripted import ScriptedEngine, turns_script
from orchestra_jax.env.search import LocalRetriever, open_bm25
from orchestra_jax.env.toolorchestra_tools import ALIASES
from orchestra_jax.env.trajectory import EpisodeConfig
from orchestra_jax.eval import baselines, benchmarks, harness
from orchestra_jax.eval.inputs import load_tools_file
from orchestra_jax.eval.policies import PolicyError, load_policy
from orchestra_jax.eval.results import ResultsFile
from orchestra_jax.models import chat_template
from orchestra_jax.models.tokenizer import train_small_tokenizer
from orchestra_jax.rl.checkpoint import Checkpointer, params_digest
from orchestra_jax.rl.train_step import TrainState

EXPERT = "local-expert"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A test-tiny Qwen3 checkpoint (random weights) with a small tokenizer, saved as an HF directory."""
    prompt = chat_template.render(
        [{"role": "system", "content": "You are good at using tools."}, {"role": "user", "content": "Who?"}],
        baselines.cpu_tools(tasks_cpu.make_world(0, 5)).catalog.schemas(),
        True,
        False,
    )
    texts = [prompt, '<tool_call>\n{"name": "answer", "arguments": {"answer": "42"}}\n</tool_call>'] * 5
    tokenizer = train_small_tokenizer(texts, 420)
    config = dataclasses.replace(
        models.get_preset("qwen3-tiny", tokenizer.vocab_size), eos_token_ids=tokenizer.eos_token_ids
    )
    params = models.init_params(config, jax.random.key(random.randrange(2**31)))
    out = tmp_path_factory.mktemp("tiny")
    models.save_pretrained(config, params, out)
    tokenizer.save(out)
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(model_dir):
    """`orchestra-jax serve` on a loopback port, in its own process."""
    port = _free_port()
    command = [sys.executable, "-m", "orchestra_jax.cli", "serve", "--model-path", str(model_dir),
               "--port", str(port), "--context-length", "8192", "--max-running-requests", "4"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"orchestra-jax serve exited: {process.stderr.read()[-500:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("orchestra-jax serve did not come up in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()


def tools_file(path, url):
    """Every model alias served by the local expert; search aliases search for the question itself."""
    alias_map = {a: EXPERT for aliases in ALIASES.values() for a in aliases}
    alias_map.update({a: "passthrough" for a in ALIASES["search"]})
    data = {
        "endpoints": [{"name": EXPERT, "base_url": url + "/v1", "model": "tiny", "context_tokens": 300,
                       "max_output_tokens": 8, "max_retries": 1}],  # fmt: skip
        "alias_map": alias_map,
        "prices": {"models": {EXPERT: {"input_per_million": 0.5, "output_per_million": 1.5}}},
    }
    path.write_text(json.dumps(data))
    return path


def test_multihop_bm25_and_a_served_expert(tmp_path, shared_data, served, model_dir):
    """A scripted orchestrator searches (BM25 over the closed corpus), then asks the served expert to answer."""
    examples = benchmarks.load_multihop(shared_data / "multihop" / "hotpotqa_train.json")
    tasks = [harness.example_task(e) for e in random.sample(examples, 2)]
    tools = load_tools_file(str(tools_file(tmp_path / "tools.json", served)))
    client = ChatClient(tools.endpoints)
    retriever = LocalRetriever(open_bm25(shared_data / "multihop" / "hotpotqa_train_corpus.json", tmp_path / "bm25"))
    toolset = baselines.build_toolset("orchestrator", client=client, retriever=retriever, alias_map=tools.alias_map,
                                      prices=tools.prices)  # fmt: skip
    call = '<tool_call>\n{{"name": "{}", "arguments": {{"model": "{}"}}}}\n</tool_call>'
    script = turns_script({t.id: [call.format("search", "search-2"), call.format("answer", "answer-1")] for t in tasks})
    tokenizer = models.tokenizer.Tokenizer.from_file(model_dir)
    env = harness.EvalEnvironment(
        engine=ScriptedEngine(tokenizer, script),
        tokenizer=tokenizer,
        episode=EpisodeConfig(mode=toolset.mode, max_turns=3, max_context=1 << 16, system_prompt=toolset.system_prompt),
        setup=lambda task, rollout: EpisodeSetup(toolset.catalog),
        prices=tools.prices,
        judge=harness.reference_judge(JudgeConfig(methods=("exact", "normalized"))),
    )
    store = ResultsFile(tmp_path / "out" / "results.jsonl")

    async def play():
        try:
            return await harness.run_harness(tasks, [harness.RunSpec("o", "o", 3)], env, store,
                                             harness.HarnessConfig(progress=False))  # fmt: skip
        finally:
            await client.close()

    report = asyncio.run(play())
    assert (report.ran, report.errors) == (2, 0)
    trajectories = [json.loads(x) for x in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    titles = {p.title for p in benchmarks.load_multihop_corpus(shared_data / "multihop" / "hotpotqa_train_corpus.json")}
    for row, trajectory in zip(store.read(), trajectories):
        assert row.status == "ok" and row.finish_reason == "answer"
        assert row.tool_calls == {"search": 1, "answer": 1}
        search_observation = trajectory["turns"][0]["observations"][0]
        assert search_observation.startswith("Query: ") and "Doc 1:" in search_observation
        assert any(title in search_observation for title in titles)
        ledger = trajectory["ledger"]
        assert ledger["prompt_tokens"][EXPERT] > 0 and ledger["completion_tokens"][EXPERT] > 0
        expert_cost = (ledger["prompt_tokens"][EXPERT] * 0.5 + ledger["completion_tokens"][EXPERT] * 1.5) / 1e6
        assert row.cost_usd >= expert_cost > 0
        assert row.correct is False or row.judge_method in ("exact", "normalized")


def _main(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_command_over_an_endpoint_policy(tmp_path, shared_data, served, model_dir, capsys):
    """The served tiny model answers alone (OpenAI /v1/completions; the no-tools row); two turn limits."""
    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "multihop", "--data", str(shared_data / "multihop" / "musique_train.json"),
            "--corpus", str(shared_data / "multihop" / "musique_train_corpus.json"),
            "--tools", str(tools_file(tmp_path / "tools.json", served)), "--policy", served, "--tokenizer", str(model_dir),
            "--model-name", "tiny", "--toolset", "none", "--limit", "2", "--max-turns", "1", "2", "--max-new-tokens", "8",
            "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = _main(argv, capsys)
    assert code == 0, err
    rows = ResultsFile(out / "results.jsonl").read()
    assert len(rows) == 4 and {r.max_turns for r in rows} == {1, 2} and all(r.status == "ok" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2 and "| tiny@" in stdout
    for label, s in summary.items():
        mine = [r for r in rows if r.run == label]
        assert s["scored"] == 2 and s["accuracy"] == pytest.approx(sum(r.correct for r in mine) / 2)
        assert s["cost_usd_total"] == pytest.approx(sum(r.cost_usd for r in mine)) and s["cost_usd_total"] > 0
    for name in ("pareto.png", "turns.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    # rerun: everything is resumed, nothing is played again
    code, stdout, _ = _main(argv, capsys)
    assert code == 0 and "ran 0 (errors 0), resumed 4" in stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir):
    """A training run as `orchestra-jax train` leaves it: config.json, tokenizer/ and an orbax step in ckpt/."""
    run = tmp_path_factory.mktemp("run")
    config_lib.save_config(dataclasses.replace(config_lib.test_tiny(), seed=random.randrange(100)), run / "config.json")
    models.tokenizer.Tokenizer.from_file(model_dir).save(run / "tokenizer")
    _, params = models.load_pretrained(model_dir)
    state = TrainState(jnp.int32(7), params, {}, {"mu": jax.tree.map(jnp.zeros_like, params)})
    checkpointer = Checkpointer(run / "ckpt", CheckpointConfig(every_steps=1, keep=1, async_save=False))
    checkpointer.save(7, state, {"seed": 0}, force=True)
    checkpointer.close()
    return run, params_digest(params)


def test_policy_from_a_training_run(run_dir):
    run, digest = run_dir
    policy = load_policy(str(run), max_slots=2, max_context=256)
    assert policy.name == f"{run.name}@step7" and policy.training.seed == config_lib.load_config(run / "config.json").seed
    assert params_digest(policy.engine._params) == digest
    with pytest.raises(PolicyError, match="no such checkpoint"):
        load_policy(str(run / "missing"))


def test_turn_sweep_on_a_checkpoint(tmp_path, run_dir, capsys):
    """One command sweeps turn limits on the CPU task family with a training run's checkpoint (embedded)."""
    run, _ = run_dir
    out = tmp_path / "sweep"
    argv = ["eval", "--benchmark", "tasks", "--data", "cpu-family", "--policy", str(run), "--limit", "2",
            "--max-turns", "1", "2", "3", "--max-new-tokens", "8", "--max-context", "1024", "--temperature", "1.0", "--concurrency", "2",
            "--preference", "cost", "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = _main(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["max_turns"] for s in summary.values()) == [1, 2, 3]
    assert {s["group"] for s in summary.values()} == {f"{run.name}@step7/cost"}
    assert all(s["scored"] == 2 for s in summary.values())
    with Image.open(out / "turns.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    run = json.loads((out / "run.json").read_text())
    assert run["toolset"] == "cpu" and run["report"]["ran"] == 6


def test_tau2_gold_replay_through_the_harness(tmp_path, capsys):
    pytest.importorskip("tau2")
    out = tmp_path / "tau2"
    argv = ["eval", "--benchmark", "tau2", "--data", "retail", "--policy", "tau2-gold", "--limit", "2",
            "--max-turns", "40", "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = _main(argv, capsys)
    assert code == 0, err
    (s,) = json.loads((out / "summary.json").read_text()).values()
    assert (s["scored"], s["accuracy"]) == (2, 1.0)
    rows = ResultsFile(out / "results.jsonl").read()
    assert all(r.judge_method == "environment" and r.finish_reason == "user_stop" for r in rows)
    assert all(sum(r.tool_calls.values()) > 0 and r.cost_usd > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["airline", "retail", "telecom"])
def test_tau2_gold_replay_every_domain(tmp_path, capsys, domain):
    pytest.importorskip("tau2")
    argv = ["eval", "--benchmark", "tau2", "--data", domain, "--policy", "tau2-gold", "--limit", "10",
            "--max-turns", "60", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    code, _, err = _main(argv, capsys)
    assert code == 0, err
    (s,) = json.loads((tmp_path / "summary.json").read_text()).values()
    assert (s["scored"], s["accuracy"]) == (10, 1.0)


def test_bad_input_is_one_line(tmp_path, shared_data, capsys):
    missing = tmp_path / "nope.jsonl"
    code, _, err = _main(["eval", "--benchmark", "frames", "--data", str(missing), "--policy", "x"], capsys)
    assert code == 2 and f"{missing}: benchmark file not found" in err and err.count("\n") == 1

    bad = tmp_path / "frames.jsonl"
    lines = (shared_data / "frames" / "frames.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([lines[0], "{broken", lines[1]]) + "\n")
    code, _, err = _main(["eval", "--benchmark", "frames", "--data", str(bad), "--policy", "x", "--strict"], capsys)
    assert code == 2 and f"{bad}:2: malformed line" in err and err.count("\n") == 1
    code, _, err = _main(["eval", "--benchmark", "frames", "--data", str(bad), "--policy", str(tmp_path / "ckpt")], capsys)
    assert code == 2 and f"warning: {bad}:2: malformed line" in err
    assert "no such checkpoint" in err.splitlines()[-1] and "Traceback" not in err

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n")
    code, _, err = _main(["eval", "--benchmark", "frames", "--data", str(good), "--policy", "x",
                          "--preference", "cost=2"], capsys)  # fmt: skip
    assert code == 2 and "outside [0, 1]" in err and err.count("\n") == 1
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"endpoints": [], "judges": "x"}))
    code, _, err = _main(["eval", "--benchmark", "frames", "--data", str(good), "--policy", "x", "--tools", str(tools)], capsys)
    assert code == 2 and "unknown key 'judges'" in err and err.count("\n") == 1
    tools.write_text(json.dumps({"endpoints": [{"name": "j", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]}))
    code, _, err = _main(["eval", "--benchmark", "frames", "--data", str(good), "--policy", "x", "--tools", str(tools),
                          "--judge", "j"], capsys)  # fmt: skip
    assert code == 2 and "judge endpoint 'j' has no price" in err and err.count("\n") == 1
