"""`orchestra-jax eval`: flags -> benchmark examples, policy, toolset, judge -> harness -> summary and plots.

The tools file and preference specs are read and checked in `eval.inputs`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from orchestra_jax.env.episode import EpisodeSetup
from orchestra_jax.env.judge import JudgeConfig
from orchestra_jax.env.prices import PriceError
from orchestra_jax.env.trajectory import EpisodeConfig, Task
from orchestra_jax.eval import baselines, benchmarks, harness, plots
from orchestra_jax.eval.inputs import EvalUsageError, ToolsFile, load_tools_file, parse_preference
from orchestra_jax.eval.results import ResultsFile, pass_hat_k, summarize, write_summary


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluate a policy on a benchmark: accuracy (95% CI), dollars and seconds per example."""

    benchmark: Literal["frames", "hle", "tau2", "multihop", "tasks"]
    policy: str
    """Run directory of orbax checkpoints, HF model directory, .gguf file, an http(s) OpenAI-compatible URL, or
    'tau2-gold' (replays each τ² task's gold actions: a check of the pipeline, it should score 100%)."""
    data: str | None = None
    """Benchmark file: FRAMES/HLE JSONL, multihop questions JSON, our task JSONL or 'cpu-family'; tau2: the domain."""
    out: str = "eval_out"
    corpus: str | None = None
    """Passages for local BM25 search (multihop's corpus JSON, or any corpus search.load_corpus reads)."""
    tools: str | None = None
    """Tools file: model endpoints, alias map, prices, judge and user-simulator endpoint names (see eval.inputs)."""
    toolset: Literal["auto", "none", "basic", "orchestrator", "cpu"] = "auto"
    """auto: 'cpu' for cpu-family tasks, 'orchestrator' when --tools has endpoints, else 'basic'."""
    preference: tuple[str, ...] = ("default",)
    """One run per preference: 'task' (each task's own), 'default', 'accuracy', 'cost', 'latency', 'balanced', or
    'outcome=1,cost=0.5,latency=0,tool.search=0.3'."""
    max_turns: tuple[int, ...] = (10,)
    """Turn limits; several make a sweep (one run each, plotted as accuracy and cost vs turns)."""
    limit: int | None = None
    concurrency: int = 8
    trials: int = 1
    """Episodes per example and run; k > 1 adds pass^k to the summary (τ²-bench's metric over trials)."""
    budget_usd: float | None = None
    """Stop starting examples once total spend (policy, tools, judge; earlier runs in --out included) reaches it."""
    label: str | None = None
    """Run-label prefix (default: the policy's name); evaluate several policies into one --out to compare them."""
    tokenizer: str | None = None
    model_name: str | None = None
    """Model id sent to an endpoint policy."""
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str | None = None
    chat_template: Literal["qwen3", "smollm2"] | None = None
    judge: str | None = None
    """LLM judge endpoint name (overrides the tools file's 'judge'); without one, exact and normalised match only."""
    judge_prompt: Literal["toolorchestra", "hle"] | None = None
    """Default: 'hle' (the official HLE judge) on HLE, ToolOrchestra's <correct> prompt elsewhere."""
    strict: bool = False
    """A malformed benchmark line is fatal (default: reported with file:line and skipped)."""
    max_new_tokens: int = 512
    max_context: int = 4096
    temperature: float = 0.0
    seed: int = 0
    task_seed: int = 1000
    """cpu-family: seed of the generated evaluation tasks (training draws from seed 0 upward)."""
    progress: bool = True


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_examples(args: EvalArgs) -> list[Task]:
    """The benchmark as episode tasks (tau2 tasks are built by the tau2 adapter)."""
    if args.benchmark == "tau2":
        from orchestra_jax.env import tau2

        domain = args.data or "airline"
        try:
            return [tau2.to_task(domain, t) for t in tau2.load_tasks(domain)]
        except tau2.Tau2Error as e:
            raise EvalUsageError(str(e)) from None
    if args.data is None:
        raise EvalUsageError(f"--data is required for --benchmark {args.benchmark} (the benchmark file)")
    if args.data == "cpu-family":
        return []  # generated once the policy is known: a training run fixes the family's world
    on_skip = None if args.strict else _warn
    try:
        if args.benchmark == "frames":
            examples = benchmarks.load_frames(args.data, strict=args.strict, on_skip=on_skip)
        elif args.benchmark == "hle":
            examples = benchmarks.load_hle(args.data, strict=args.strict, on_skip=on_skip)
        elif args.benchmark == "multihop":
            examples = benchmarks.load_multihop(args.data)
        else:
            return _load_tasks(args)
    except benchmarks.BenchmarkError as e:
        raise EvalUsageError(str(e)) from None
    return [harness.example_task(e) for e in examples]


def _load_tasks(args: EvalArgs) -> list[Task]:
    from orchestra_jax.data.tasks import TaskFileError, load_playable_tasks

    try:
        return load_playable_tasks(args.data)
    except TaskFileError as e:
        raise EvalUsageError(str(e)) from None


def cpu_family_tasks(args: EvalArgs, world: Any) -> list[Task]:
    """Held-out CPU-family tasks (seed `--task-seed`) over the world a checkpoint was trained in."""
    from orchestra_jax.env import tasks_cpu

    return tasks_cpu.generate_tasks(args.limit or 50, seed=args.task_seed, world=world)


def _retriever(args: EvalArgs, tools: ToolsFile):
    from orchestra_jax.env.search import CorpusError, HttpRetriever, LocalRetriever, open_bm25

    if args.corpus is not None:
        try:
            return LocalRetriever(open_bm25(args.corpus))
        except CorpusError as e:
            raise EvalUsageError(str(e)) from None
    return HttpRetriever(tools.retriever_url) if tools.retriever_url else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def run_specs(args: EvalArgs, policy_name: str) -> list[harness.RunSpec]:
    base = args.label or policy_name
    specs = []
    for spec in args.preference:
        preference = parse_preference(spec)
        group = f"{base}/{spec}"
        for turns in sorted(set(args.max_turns)):
            specs.append(harness.RunSpec(f"{group}/t{turns}", group, turns, preference))
    return specs


def _judge_config(args: EvalArgs, tools: ToolsFile) -> JudgeConfig:
    backend = args.judge or tools.judge
    if backend is not None and backend not in tools.endpoints:
        raise EvalUsageError(f"--judge {backend!r}: not an endpoint of --tools ({sorted(tools.endpoints) or 'none'})")
    if backend is not None:
        try:
            tools.prices.price(backend)
        except PriceError:
            raise EvalUsageError(f"judge endpoint {backend!r} has no price: add it under 'prices.models' in --tools") from None
    prompt = args.judge_prompt or ("hle" if args.benchmark == "hle" else "toolorchestra")
    methods = ("exact", "normalized", "llm") if backend else ("exact", "normalized")
    return JudgeConfig(methods=methods, backend=backend, prompt=prompt)


def _setup(args: EvalArgs, tools: ToolsFile, client: Any, toolset: baselines.Toolset | None):
    if args.benchmark != "tau2":
        from orchestra_jax.data.tasks import domain_setup

        default = EpisodeSetup(toolset.catalog)
        return lambda task, rollout: domain_setup(task, default)
    from orchestra_jax.env import tau2

    if args.policy == "tau2-gold":
        from orchestra_jax.eval.policies import tau2_gold_setup

        return tau2_gold_setup
    if tools.tau2_user is None:
        raise EvalUsageError("--benchmark tau2 needs a user simulator: set 'tau2_user' in --tools")
    return tau2.tools_file_setup(client, tools.tau2_user, tools.alias_map)


async def _evaluate(args: EvalArgs) -> dict[str, Any]:
    from orchestra_jax.env import tasks_cpu
    from orchestra_jax.env.llm_tools import ChatClient, EndpointError
    from orchestra_jax.eval import policies

    tools = load_tools_file(args.tools)
    tasks = load_examples(args)
    judge_config = _judge_config(args, tools)
    try:
        client = ChatClient(tools.endpoints) if tools.endpoints else None
    except EndpointError as e:
        raise EvalUsageError(str(e)) from None
    try:
        policy = (
            policies.tau2_gold_policy(tasks) if args.policy == "tau2-gold" else policies.load_policy(
                args.policy, tokenizer_path=args.tokenizer, model_name=args.model_name, api=args.api,
                api_key_env=args.api_key_env, chat_template=args.chat_template,
                max_slots=max(1, args.concurrency), max_context=args.max_context, seed=args.seed,
            )
        )  # fmt: skip
    except policies.PolicyError as e:
        raise EvalUsageError(str(e)) from None
    world = tasks_cpu.make_world(policy.training.seed if policy.training is not None else 0)
    coverage = policy.training.env.expert_coverage if policy.training is not None else 1.0  # the run's own expert
    if args.data == "cpu-family":
        tasks = cpu_family_tasks(args, world)
    toolset, name = None, "tau2"
    if args.benchmark != "tau2":
        name = args.toolset
        if name == "auto":
            name = "cpu" if args.data == "cpu-family" else ("orchestrator" if client else "basic")
        try:
            toolset = baselines.build_toolset(name, client=client, retriever=_retriever(args, tools),
                                              alias_map=tools.alias_map, prices=tools.prices, world=world,
                                              expert_coverage=coverage)  # fmt: skip
        except baselines.ToolsetError as e:
            raise EvalUsageError(str(e)) from None
    prices = tasks_cpu.cpu_prices(tools.prices) if name == "cpu" else tools.prices
    episode = EpisodeConfig(
        mode=toolset.mode if toolset else "history",
        max_new_tokens=args.max_new_tokens,
        max_context=args.max_context,
        temperature=args.temperature,
        seed=args.seed,
        family=policy.family,
        system_prompt=toolset.system_prompt if toolset else EpisodeConfig.system_prompt,
    )
    if args.policy == "tau2-gold":
        episode = dataclasses.replace(episode, max_new_tokens=4096, max_context=1 << 20)
    env = harness.EvalEnvironment(
        engine=policy.engine,
        tokenizer=policy.tokenizer,
        episode=episode,
        setup=_setup(args, tools, client, toolset),
        prices=prices,
        judge=harness.reference_judge(judge_config, client, prices),
    )
    specs = run_specs(args, policy.name)
    if tasks and toolset is not None:
        await policies.warm_up(policy, episode.system_prompt, tasks[0].question, toolset.catalog.schemas())
    config = harness.HarnessConfig(
        concurrency=args.concurrency, limit=args.limit, budget_usd=args.budget_usd, progress=args.progress,
        trials=args.trials,
    )  # fmt: skip
    try:
        report = await harness.run_harness(tasks, specs, env, ResultsFile(Path(args.out) / "results.jsonl"), config)
    finally:
        await policy.close()
        if client is not None:
            await client.close()
    return {"report": report.to_json(), "toolset": name, "policy": policy.name, "runs": [s.label for s in specs]}


def write_outputs(out: str | os.PathLike, title: str = "") -> dict[str, dict[str, Any]]:
    """summary.json, summary.md, pareto.png and one turn-sweep plot per swept group, from results.jsonl."""
    out = Path(out)
    rows = ResultsFile(out / "results.jsonl").read()
    by_run = harness.summaries_by_run(rows)
    summaries = {}
    for label, run_rows in by_run.items():
        summary = summarize(run_rows)
        summary["max_turns"] = run_rows[0].max_turns
        summary["group"] = run_rows[0].group
        if any(r.trial for r in run_rows):
            summary["pass_hat_k"] = pass_hat_k(run_rows)
        summaries[label] = summary
    write_summary(out, summaries)
    if summaries:
        plots.plot_pareto(summaries, out / "pareto.png", title=f"{title} accuracy vs cost".strip())
    groups = harness.turn_groups(rows)
    for group, by_turns in groups.items():
        name = "turns.png" if len(groups) == 1 else f"turns-{_slug(group)}.png"
        sweep = {t: summaries[label] for t, label in by_turns.items()}
        plots.plot_turn_sweep(sweep, out / name, title=f"{group}: accuracy and cost vs turn limit")
    return summaries


def run_eval(args: EvalArgs) -> int:
    """The eval command: run, then write summaries and plots; prints the Markdown table."""
    if args.concurrency < 1:
        raise EvalUsageError(f"--concurrency {args.concurrency}: must be at least 1")
    if args.policy == "tau2-gold" and args.benchmark != "tau2":
        raise EvalUsageError("--policy tau2-gold replays τ² gold actions: use it with --benchmark tau2")
    if args.trials < 1:
        raise EvalUsageError(f"--trials {args.trials}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise EvalUsageError(f"--limit {args.limit}: must be at least 1")
    if args.budget_usd is not None and args.budget_usd < 0:
        raise EvalUsageError(f"--budget-usd {args.budget_usd}: must be non-negative")
    for spec in args.preference:
        parse_preference(spec)
    if not args.max_turns or any(t < 1 for t in args.max_turns):
        raise EvalUsageError(f"--max-turns {list(args.max_turns)}: give one or more positive turn limits")
    outcome = asyncio.run(_evaluate(args))
    write_outputs(args.out, title=args.benchmark)
    run_json = Path(args.out) / "run.json"
    tmp = run_json.with_name(".run.json.tmp")
    tmp.write_text(json.dumps({"args": dataclasses.asdict(args), **outcome}, indent=2, default=str) + "\n")
    os.replace(tmp, run_json)
    print((Path(args.out) / "summary.md").read_text(), end="")
    report = outcome["report"]
    print(
        f"ran {report['ran']} (errors {report['errors']}), resumed {report['skipped']}, "
        f"spent ${report['spent_usd']:.4f}" + (f"; stopped by the budget with {report['pending']} left" if report["stopped"] else "")
    )
    return 0
