"""The pieces one training run plays with: tokenizer, model config, tool catalog, prices and the task stream.

`env.tasks` is the CPU task family (`cpu-family`, generated here), a task JSONL (`orchestra-jax synth`'s, or
any file in our task format) or a tau2 domain (`tau2:retail`). The family's tokenizer is a small byte-level BPE
trained on its own texts, including the rendered system prompt with the tool schemas, so prompts stay short for
a tiny policy; it is saved in the run directory and re-read on resume, so ids never drift between a run and its
continuation. A task file is played with the policy's own tokenizer (`model.source` a checkpoint directory) and
the eval harness's tools: the orchestrator toolset over `env.tools_file`'s endpoints, or sandboxed Python (and
search, given a retriever) without them; a synthesised domain task gets its domain's tools and is graded by
executing its evaluator. A tau2 domain plays as eval plays it: a fresh session per episode, the tools file's
user simulator, tau2's own grader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestra_jax.config import ConfigError, TrainConfig
from orchestra_jax.env import tasks_cpu
from orchestra_jax.env.catalog import ToolCatalog
from orchestra_jax.env.episode import EpisodeSetup
from orchestra_jax.env.preferences import Preference, PreferenceDistribution, sample_preference
from orchestra_jax.env.prices import PriceTable
from orchestra_jax.env.trajectory import EpisodeConfig, Task
from orchestra_jax.models.chat_template import family_of
from orchestra_jax.models.tokenizer import Tokenizer
from orchestra_jax.models.transformer_config import PRESETS as MODEL_PRESETS
from orchestra_jax.models.transformer_config import TransformerConfig, get_preset

CPU_TOKENIZER_VOCAB = 4096


@dataclass(frozen=True)
class Environment:
    tokenizer: Tokenizer
    catalog: ToolCatalog
    prices: PriceTable
    world: Any
    tool_names: tuple[str, ...]
    template_family: str
    system_prompt: str = tasks_cpu.SYSTEM_PROMPT
    tasks: tuple[Task, ...] = ()
    """A task file's or a tau2 domain's tasks (empty for the CPU family, whose tasks are generated)."""
    setup: Callable[[Task, int], EpisodeSetup] | None = None
    """Per-episode tools, user and grader (a synthesised domain task's, a tau2 session's); None: `catalog` and
    the reference answer."""
    own_preferences: frozenset[str] = frozenset()
    """Ids of the task file's tasks that carry a preference of their own."""


def preference_distribution(config: TrainConfig, tool_names: tuple[str, ...]) -> PreferenceDistribution:
    kind = config.env.preference_sampling
    outcome, cost, latency = config.reward.fixed_outcome, config.reward.fixed_cost, config.reward.fixed_latency
    fixed = Preference(tuple((n, 0.0) for n in tool_names), outcome, cost, latency)
    return PreferenceDistribution(kind=kind, fixed=fixed, tool_keep_prob=0.0)


def task_stream(config: TrainConfig, env: Environment, count: int) -> list[Task]:
    """The RL tasks in order: step s takes [s * prompts_per_step, (s + 1) * prompts_per_step). A task file's
    tasks come in seeded passes; a task keeps its own preference (under env.task_preferences 'keep') or gets one
    drawn for it. A longer stream starts with a shorter one (so --resume with more --steps replays the same
    steps)."""
    if env.tasks:
        rng = np.random.default_rng(config.seed + 1)
        dist = preference_distribution(config, env.tool_names)
        keep = env.own_preferences if config.env.task_preferences == "keep" else frozenset()
        out: list[Task] = []
        while len(out) < count:
            for i in rng.permutation(len(env.tasks)):
                drawn = sample_preference(rng, env.tool_names, dist)  # drawn always: the stream stays seeded alike
                task = env.tasks[i]
                out.append(task if task.id in keep else dataclasses.replace(task, preference=drawn))
        return out[:count]
    return tasks_cpu.generate_tasks(
        count, seed=config.seed + 1, world=env.world,
        preferences=preference_distribution(config, env.tool_names),
    )


def demonstration_tasks(config: TrainConfig, env: Environment) -> list[Task]:
    """Tasks for the SFT warm start, drawn from another seed than the RL stream."""
    return tasks_cpu.generate_tasks(
        config.algorithm.sft_demonstrations, seed=config.seed + 1_000_003, world=env.world,
        preferences=preference_distribution(config, env.tool_names),
    )


def build_environment(config: TrainConfig, run_root: Path) -> Environment:
    """World, catalog, prices and tokenizer for `config.env.tasks` (trained or re-read from run_root/tokenizer)."""
    if config.env.tasks.startswith("tau2:"):
        return _tau2_environment(config)
    if config.env.tasks != "cpu-family":
        return _task_file_environment(config)
    world = tasks_cpu.make_world(config.seed)
    catalog = tasks_cpu.cpu_catalog(world, expert_coverage=config.env.expert_coverage)
    source = config.model.source
    tokenizer_dir = run_root / "tokenizer"
    if source not in MODEL_PRESETS:
        tokenizer = Tokenizer.from_file(source)
    elif (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(tokenizer_dir)
    else:
        tasks = tasks_cpu.generate_tasks(400, seed=12345, world=world)
        tokenizer = tasks_cpu.family_tokenizer(world, catalog, tasks, CPU_TOKENIZER_VOCAB, out_dir=tokenizer_dir)
    names = tuple(t.name for t in catalog.tools)
    family = "qwen3" if source in MODEL_PRESETS else _template_family(config)
    return Environment(tokenizer, catalog, tasks_cpu.cpu_prices(), world, names, family)


def _check_outside_the_family(config: TrainConfig) -> None:
    """What a task file and tau2 both need: the policy's own tokenizer, and no scripted warm start."""
    source = config.model.source
    if source in MODEL_PRESETS:
        raise ConfigError(f"env.tasks: {config.env.tasks} is played with the policy's own tokenizer; set "
                          f"--model.source to a checkpoint directory (not the preset {source!r})")
    if config.algorithm.sft_steps > 0:
        raise ConfigError("algorithm.sft_steps: the warm start's scripted demonstrations exist for the cpu family "
                          f"only (set it to 0 with {config.env.tasks})")


def _template_family(config: TrainConfig) -> str:
    """The chat template of a checkpoint-directory policy, from its config.json's family (as `serve` picks)."""
    return family_of(model_config(config, None).family)


def _tau2_environment(config: TrainConfig) -> Environment:
    """tau2's domain: every task, a fresh session per episode, the tools file's user simulator (and experts),
    graded by tau2's own evaluator, as `orchestra-jax eval --benchmark tau2` plays it."""
    import asyncio

    from orchestra_jax.env import tau2
    from orchestra_jax.env.llm_tools import ChatClient, EndpointError
    from orchestra_jax.eval.inputs import EvalUsageError, load_tools_file

    _check_outside_the_family(config)
    domain = config.env.tasks.removeprefix("tau2:")
    try:
        tasks = tuple(tau2.to_task(domain, t) for t in tau2.load_tasks(domain))
        tools = load_tools_file(config.env.tools_file)
        if tools.tau2_user is None:
            raise ConfigError(f"env.tools_file: {config.env.tasks} needs a user simulator: set 'tau2_user' to one of "
                              f"the tools file's endpoints (given: {config.env.tools_file})")
        setup = tau2.tools_file_setup(ChatClient(tools.endpoints), tools.tau2_user, tools.alias_map)
        catalog = asyncio.run(setup(tasks[0], 0)).catalog  # the domain's tools, named for the preferences
    except (tau2.Tau2Error, EvalUsageError, EndpointError) as e:
        raise ConfigError(f"env: {str(e).splitlines()[0]}") from None
    return Environment(
        Tokenizer.from_file(config.model.source), catalog, tools.prices, None, tuple(t.name for t in catalog.tools),
        _template_family(config), tasks[0].metadata["system_prompt"], tasks, setup,
    )


def _task_file_environment(config: TrainConfig) -> Environment:
    from orchestra_jax.data.tasks import TaskFileError, domain_setup, load_tasks, playable_tasks
    from orchestra_jax.env.llm_tools import ChatClient, EndpointError
    from orchestra_jax.env.search import HttpRetriever
    from orchestra_jax.eval import baselines
    from orchestra_jax.eval.inputs import EvalUsageError, load_tools_file

    _check_outside_the_family(config)
    source = config.model.source
    try:
        records = load_tasks(config.env.tasks)
        tasks = playable_tasks(records, config.env.tasks)
        own = frozenset(r.id for r in records if r.preference is not None)
        tools = load_tools_file(config.env.tools_file)
        client = ChatClient(tools.endpoints) if tools.endpoints else None
        retriever = HttpRetriever(tools.retriever_url) if tools.retriever_url else None
        toolset = baselines.build_toolset("orchestrator" if client else "basic", client=client, retriever=retriever,
                                          alias_map=tools.alias_map, prices=tools.prices)
    except (TaskFileError, EvalUsageError, EndpointError, baselines.ToolsetError) as e:
        raise ConfigError(f"env: {str(e).splitlines()[0]}") from None
    if not tasks:
        raise ConfigError(f"env.tasks: {config.env.tasks} holds no tasks")
    default = EpisodeSetup(toolset.catalog)
    return Environment(
        Tokenizer.from_file(source), toolset.catalog, tools.prices, None, tuple(t.name for t in toolset.catalog.tools),
        _template_family(config), toolset.system_prompt, tuple(tasks),
        lambda task, rollout: domain_setup(task, default), own,
    )


def model_config(config: TrainConfig, tokenizer: Tokenizer | None) -> TransformerConfig:
    """A model preset sized to the tokenizer, or the config of a checkpoint path (read without weights)."""
    source = config.model.source
    if source in MODEL_PRESETS:
        model = get_preset(source, vocab_size=tokenizer.vocab_size if tokenizer is not None else None)
        if model.vocab_size < (tokenizer.vocab_size if tokenizer is not None else 0):
            raise ConfigError(f"model.source: {source} has {model.vocab_size} ids, the tokenizer {tokenizer.vocab_size}")
        return model
    pretrained = pretrained_dir(config)
    if pretrained is not None:  # the shapes of the weights the run will load
        import json

        from orchestra_jax.models.transformer_config import from_hf_config

        config_json = pretrained / "config.json"
        return from_hf_config(json.loads(config_json.read_text()), source=str(config_json))
    name = Path(source).name.lower()
    if name in MODEL_PRESETS:
        return get_preset(name)
    raise ConfigError(f"model.source: {source!r} is neither a model preset nor a directory with config.json")


def pretrained_dir(config: TrainConfig) -> Path | None:
    """The HF checkpoint directory whose weights the run starts from (None: a preset, randomly initialised)."""
    source = Path(config.model.source)
    if config.model.source in MODEL_PRESETS or not (source / "config.json").is_file():
        return None
    return source


def episode_config(config: TrainConfig, env: Environment, step: int) -> EpisodeConfig:
    """Sampling and shaping of one step's episodes; the seed depends on (run seed, step) only."""
    r = config.rollout
    return dataclasses.replace(
        EpisodeConfig(),
        mode=config.env.prompt_mode,
        max_turns=config.env.max_turns,
        max_new_tokens=r.max_new_tokens,
        max_context=r.max_context,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        min_p=r.min_p,
        seed=config.seed * 1_000_003 + step,
        enable_thinking=False,
        family=env.template_family,
        system_prompt=env.system_prompt,
    )
