"""`orchestra-jax bench episodes`: throughput of the episode loop and its tool pool on the CPU task family.

64 episodes run at once through the real loop, real sandbox, real BM25 and the local expert. By default the
policy is the scripted demonstration policy, so the numbers measure the environment (template rendering,
parsing, tool execution, ledger) rather than a model; `--policy embedded` puts a random qwen3-tiny behind the
embedded JAX sampler instead (64 slots of continuous batching). Tool-pool utilisation is busy worker-seconds over the pool's
worker-seconds during the run's wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Literal

from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.episode import ToolPool, run_episodes
from orchestra_jax.env.trajectory import EpisodeConfig


@dataclasses.dataclass(frozen=True)
class EpisodeBenchArgs:
    """Flags of `orchestra-jax bench episodes`."""

    episodes: int = 64
    concurrency: int = 64
    """Episodes in flight at once."""
    workers: int = 16
    """Tool-pool size: tool calls running at once across all episodes."""
    repeats: int = 2
    """Timed runs after one warm-up run (fresh tasks each run); the best and the mean are printed."""
    expert_share: float = 0.3
    seed: int = 0
    policy: Literal["scripted", "embedded"] = "scripted"
    """'scripted': the demonstration policy (measures the environment); 'embedded': a random qwen3-tiny in the
    embedded JAX sampler with `concurrency` slots (measures the loop with a real engine; its output is noise,
    so it rarely calls a tool)."""
    max_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class EpisodeBenchResult:
    wall_s: float
    episodes: int
    correct: int
    tool_calls: dict[str, int]
    busy_s: float
    workers: int
    peak_tool_calls: int

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.wall_s

    @property
    def utilisation(self) -> float:
        return self.busy_s / (self.workers * self.wall_s)


async def run_once(args: EpisodeBenchArgs, world, catalog, tokenizer, seed: int) -> EpisodeBenchResult:
    tasks = tasks_cpu.generate_tasks(args.episodes, seed, world=world)
    if args.policy == "scripted":
        engine = tasks_cpu.demonstration_engine(tasks, tokenizer, expert_share=args.expert_share, seed=seed)
    else:
        engine = _embedded_engine(args, tokenizer)
    pool = ToolPool(args.workers)
    config = EpisodeConfig(
        max_turns=2, max_new_tokens=args.max_new_tokens, system_prompt=tasks_cpu.SYSTEM_PROMPT, seed=seed
    )
    start = time.perf_counter()
    trajectories = await run_episodes(
        engine,
        tokenizer,
        catalog,
        tasks,
        config,
        concurrency=args.concurrency,
        pool=pool,
        prices=tasks_cpu.cpu_prices(),
    )
    wall = time.perf_counter() - start
    calls: Counter[str] = Counter()
    for t in trajectories:
        calls.update(t.tool_counts)
    return EpisodeBenchResult(
        wall,
        len(trajectories),
        sum(t.correct for t in trajectories),
        dict(calls),
        pool.busy_s,
        pool.workers,
        pool.peak,
    )


def _embedded_engine(args: EpisodeBenchArgs, tokenizer):
    import jax

    from orchestra_jax.models import get_preset, init_params
    from orchestra_jax.rollout.sampler import EmbeddedEngine

    config = get_preset("qwen3-tiny", vocab_size=tokenizer.vocab_size)
    config = dataclasses.replace(config, eos_token_ids=tuple(tokenizer.eos_token_ids))
    params = init_params(config, jax.random.key(args.seed))
    return EmbeddedEngine(config, params, max_slots=args.concurrency, max_context=1024, seed=args.seed)


def run(args: EpisodeBenchArgs) -> int:
    if min(args.episodes, args.concurrency, args.workers, args.repeats) < 1:
        raise ValueError("episodes, concurrency, workers and repeats must be >= 1")
    world = tasks_cpu.make_world(args.seed)
    catalog = tasks_cpu.cpu_catalog(world)
    tasks = tasks_cpu.generate_tasks(64, args.seed, world=world)
    tokenizer = tasks_cpu.family_tokenizer(world, catalog, tasks, 1024)
    print(
        f"bench episodes: {args.episodes} CPU-family episodes, {args.concurrency} in flight, "
        f"tool pool of {args.workers}, {args.policy} policy"
    )
    asyncio.run(run_once(args, world, catalog, tokenizer, args.seed + 1000))  # warm-up: imports, caches
    results = [
        asyncio.run(run_once(args, world, catalog, tokenizer, args.seed + r)) for r in range(args.repeats)
    ]
    for i, r in enumerate(results):
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r.tool_calls.items()))
        print(
            f"run {i}: {r.wall_s:.2f} s, {r.episodes_per_s:.1f} episodes/s, tool-pool utilisation "
            f"{100 * r.utilisation:.1f}% ({r.busy_s:.1f} busy worker-s, peak {r.peak_tool_calls} calls at once), "
            f"correct {r.correct}/{r.episodes}; calls: {calls}"
        )
    best = max(results, key=lambda r: r.episodes_per_s)
    mean_rate = sum(r.episodes_per_s for r in results) / len(results)
    mean_util = sum(r.utilisation for r in results) / len(results)
    print(
        f"episodes/s: best {best.episodes_per_s:.1f}, mean {mean_rate:.1f}; "
        f"tool-pool utilisation: mean {100 * mean_util:.1f}%"
    )
    return 0
