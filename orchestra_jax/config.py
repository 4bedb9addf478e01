"""Run configuration: frozen dataclasses composed into one `TrainConfig`.

tyro builds the command line from these classes, so every field is a flag (`--optimizer.lr 1e-6`).
Presets are plain functions returning a `TrainConfig`. `validate` turns a bad combination into one
`ConfigError` line naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the field and the value."""


@dataclass(frozen=True)
class ModelConfig:
    """Which policy to train and how to compute with it."""

    source: str = "qwen3-tiny"
    """A preset name from orchestra_jax.models (e.g. 'qwen3-tiny'), randomly initialised, or an HF checkpoint directory (config.json, safetensors, tokenizer files) whose weights the run starts from; `orchestra-jax convert` makes one from a .gguf file or orbax params."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    """Activation checkpointing of each decoder layer: 'none', 'full' (recompute everything) or 'dots' (save matmul outputs, recompute the rest)."""
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    """Training attention: 'cudnn' (fused flash attention; GPU with bf16/fp16 compute; packed rows go as segment offsets on Hopper and later, else as a dense [B, 1, T, T] mask), 'xla' (query blocks in plain XLA) or 'auto' (cuDNN where it runs, unless it would need a mask over 512 MiB)."""


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over ('data', 'fsdp', 'tensor'); one size may be -1, meaning all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    coordinator_address: str | None = None
    """Multi-host: set these (or let TPU/SLURM environment variables say it) to call jax.distributed.initialize."""
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class RolloutConfig:
    """Where tokens come from: the embedded JAX sampler, or SGLang servers over HTTP."""

    engine: Literal["embedded", "sglang"] = "embedded"
    endpoints_file: str | None = None
    """JSON file listing SGLang server URLs (written by launch/sglang_fleet.py); engine='sglang' only."""
    max_slots: int = 64
    decode_chunk: int = 16
    """Embedded engine: decode steps per jitted call. More amortises each call's fixed cost; a row that
    finishes mid-chunk idles until the chunk ends."""
    max_new_tokens: int = 256
    max_context: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    weight_sync_dir: str | None = None
    """Export directory for per-step weight sync to SGLang (a shared filesystem or /dev/shm)."""


@dataclass(frozen=True)
class EnvConfig:
    """The orchestration environment: which tasks, which tools, how episodes are shaped."""

    tasks: str = "cpu-family"
    """'cpu-family' (generated locally), a task JSONL path, or 'tau2:<domain>'."""
    max_turns: int = 4
    prompt_mode: Literal["history", "context"] = "history"
    concurrency: int = 64
    """Episodes in flight at once during rollout."""
    tools_file: str | None = None
    preference_sampling: Literal["fixed", "uniform", "dirichlet"] = "uniform"
    """Distribution preference vectors are drawn from per task: 'fixed', 'uniform' or 'dirichlet'."""
    task_preferences: Literal["keep", "draw"] = "keep"
    """A task file's own preferences: 'keep' them (a task without one gets a draw) or 'draw' for every task."""
    expert_coverage: float = 1.0
    """CPU task family: the share of towns and of arithmetic questions the local expert knows (it says "I do
    not know." about the rest)."""


@dataclass(frozen=True)
class RewardConfig:
    """ToolOrchestra's preference-weighted, group-normalised reward (DESIGN.md section 4)."""

    mode: Literal["paper", "released"] = "paper"
    """'paper' follows the paper's formulas; 'released' reproduces the released code's quirks."""
    advantage_clip: float | None = 3.0
    advantage_eps: float = 1e-6
    min_group_std: float = 0.1
    drop_invalid_answers: bool = True
    drop_malformed_turns: bool = True
    fixed_outcome: float = 1.0
    """Preference weights used when env.preference_sampling is 'fixed' (every tool weight is 0 then)."""
    fixed_cost: float = 1.0
    fixed_latency: float = 0.0


@dataclass(frozen=True)
class AlgorithmConfig:
    """Policy-gradient settings; defaults are ToolOrchestra's GRPO recipe."""

    name: Literal["grpo", "ppo"] = "grpo"
    prompts_per_step: int = 16
    group_size: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 10.0
    kl_coef: float = 1e-4
    kl_estimator: Literal["k1", "k2", "k3"] = "k2"
    kl_in_reward: bool = False
    """Take the KL out of the loss and into the reward, as verl's use_kl_in_reward: GRPO normalises each group's
    reward - kl_coef x KL (summed over the rollout's policy tokens); PPO lowers each token's GAE reward by
    kl_coef x its KL. The KL is the engine's (behaviour) log-probs against the reference's, so it is that of the
    policy that sampled."""
    entropy_coef: float = 0.0
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    tis_cap: float | None = None
    """Truncated importance sampling cap against the engine's behaviour log-probs; None disables it."""
    gamma: float = 1.0
    gae_lambda: float = 1.0
    micro_batch_size: int = 8
    mini_batches: int = 1
    """Optimizer updates per RL step: the step's samples are shuffled and split into this many mini-batches
    (verl's train_batch_size / ppo_mini_batch_size); later ones are off-policy, which the clip bounds."""
    epochs: int = 1
    """Passes over the step's samples (verl's ppo_epochs); updates per step = epochs x mini_batches."""
    off_policy_overlap: bool = False
    """Overlap the next step's rollouts with this step's update (one step off-policy)."""
    value_coef: float = 0.5
    """PPO: weight of the critic's squared error in the loss."""
    sft_steps: int = 0
    """Supervised warm-start steps on demonstration trajectories before RL (0 = none)."""
    sft_lr: float = 1e-3
    sft_batch_size: int = 32
    sft_demonstrations: int = 256
    """How many tasks to record scripted demonstrations for (the CPU task family)."""
    sft_expert_share: float = 0.3
    """Share of the demonstrations that ask the expert instead of the cheap tool (the CPU task family)."""


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a schedule and global-norm gradient clipping."""

    lr: float = 1e-6
    schedule: Literal["constant", "warmup-constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of params, optimizer state, step, RNG and data position."""

    every_steps: int = 10
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    """TensorBoard and trajectory logging."""

    every_steps: int = 1
    trajectories_per_step: int = 4
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Everything one `orchestra-jax train` run needs; saved as `config.json` in its run directory."""

    name: str = "cpu-demo"
    run_dir: str | None = None
    """Where the run directory lives; defaults to runs/<name>."""
    steps: int = 40
    seed: int = 0
    resume: bool = False
    dry_run: bool = False
    """Print the plan, the mesh and a memory/time estimate, then exit without loading weights."""
    dry_run_compile: bool = False
    """With --dry-run: also compile the step for this host's devices on abstract weights and print XLA's memory
    figures beside the estimate (the check on the machine that will run it; takes a compile)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def validate(config: TrainConfig, num_devices: int | None = None) -> TrainConfig:
    """Check cross-field constraints; raise ConfigError naming the first bad field. Returns the config."""

    def fail(name: str, value: Any, why: str) -> None:
        raise ConfigError(f"config field {name}={value!r}: {why}")

    positive = {
        "steps": config.steps,
        "algorithm.prompts_per_step": config.algorithm.prompts_per_step,
        "algorithm.group_size": config.algorithm.group_size,
        "algorithm.micro_batch_size": config.algorithm.micro_batch_size,
        "algorithm.mini_batches": config.algorithm.mini_batches,
        "algorithm.epochs": config.algorithm.epochs,
        "algorithm.sft_batch_size": config.algorithm.sft_batch_size,
        "rollout.max_slots": config.rollout.max_slots,
        "rollout.decode_chunk": config.rollout.decode_chunk,
        "rollout.max_new_tokens": config.rollout.max_new_tokens,
        "rollout.max_context": config.rollout.max_context,
        "env.max_turns": config.env.max_turns,
        "env.concurrency": config.env.concurrency,
        "checkpoint.every_steps": config.checkpoint.every_steps,
        "checkpoint.keep": config.checkpoint.keep,
        "logging.every_steps": config.logging.every_steps,
    }
    for name, value in positive.items():
        if value <= 0:
            fail(name, value, "must be positive")
    if config.optimizer.lr <= 0:
        fail("optimizer.lr", config.optimizer.lr, "must be positive")
    if config.algorithm.sft_lr <= 0:
        fail("algorithm.sft_lr", config.algorithm.sft_lr, "must be positive")
    if config.algorithm.sft_steps < 0:
        fail("algorithm.sft_steps", config.algorithm.sft_steps, "must be non-negative")
    if config.algorithm.kl_coef < 0:
        fail("algorithm.kl_coef", config.algorithm.kl_coef, "must be non-negative")
    if not 0 <= config.optimizer.weight_decay < 1:
        fail("optimizer.weight_decay", config.optimizer.weight_decay, "must be in [0, 1)")
    if not 0 <= config.optimizer.b1 < 1:
        fail("optimizer.b1", config.optimizer.b1, "must be in [0, 1)")
    if not 0 <= config.optimizer.b2 < 1:
        fail("optimizer.b2", config.optimizer.b2, "must be in [0, 1)")
    # There is no 'off': optax scales the gradient to this norm, so 0 would zero every update.
    if config.optimizer.grad_clip <= 0:
        fail("optimizer.grad_clip", config.optimizer.grad_clip, "must be positive")
    if config.optimizer.warmup_steps < 0:
        fail("optimizer.warmup_steps", config.optimizer.warmup_steps, "must be non-negative")
    if not 0 <= config.env.expert_coverage <= 1:
        fail("env.expert_coverage", config.env.expert_coverage, "must be in [0, 1]")
    if not 0 <= config.algorithm.sft_expert_share <= 1:
        fail("algorithm.sft_expert_share", config.algorithm.sft_expert_share, "must be in [0, 1]")
    if config.rollout.temperature <= 0:
        fail("rollout.temperature", config.rollout.temperature, "must be positive")
    if not 0 < config.rollout.top_p <= 1:
        fail("rollout.top_p", config.rollout.top_p, "must be in (0, 1]")
    if not 0 <= config.rollout.min_p <= 1:
        fail("rollout.min_p", config.rollout.min_p, "must be in [0, 1]")
    if config.rollout.max_new_tokens >= config.rollout.max_context:
        fail("rollout.max_new_tokens", config.rollout.max_new_tokens, "must be below rollout.max_context")
    if config.algorithm.group_size < 2 and config.algorithm.name == "grpo":
        fail("algorithm.group_size", config.algorithm.group_size, "GRPO needs at least 2 rollouts per prompt")
    if config.algorithm.clip_low < 0 or config.algorithm.clip_high < 0:
        fail("algorithm.clip_low", config.algorithm.clip_low, "clip ranges must be non-negative")
    if config.algorithm.dual_clip is not None and config.algorithm.dual_clip <= 1:
        fail("algorithm.dual_clip", config.algorithm.dual_clip, "must be > 1 (or None to disable)")
    if config.rollout.engine == "sglang" and not config.rollout.endpoints_file:
        fail("rollout.endpoints_file", None, "engine 'sglang' needs an endpoints file")
    sizes = {"mesh.data": config.mesh.data, "mesh.fsdp": config.mesh.fsdp, "mesh.tensor": config.mesh.tensor}
    if sum(v == -1 for v in sizes.values()) > 1:
        fail("mesh", sizes, "at most one axis may be -1")
    for name, value in sizes.items():
        if value == 0 or value < -1:
            fail(name, value, "must be a positive size or -1")
    if num_devices is not None and config.model.attention == "cudnn":
        from orchestra_jax.models.transformer import attention_impl

        try:
            attention_impl(config.model.attention, config.model.compute_dtype)
        except ValueError as e:
            fail("model.attention", config.model.attention, str(e))
    if num_devices is not None:
        from orchestra_jax.parallel.mesh import resolve_mesh_shape

        try:
            shape = resolve_mesh_shape(config.mesh, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        batch = config.algorithm.prompts_per_step * config.algorithm.group_size
        data_ways = shape[0] * shape[1]
        if batch % data_ways:
            fail(
                "algorithm.prompts_per_step",
                config.algorithm.prompts_per_step,
                f"rollouts per step ({batch}) must divide over the mesh's data x fsdp = {data_ways} devices",
            )
        if config.algorithm.micro_batch_size % data_ways:
            fail(
                "algorithm.micro_batch_size",
                config.algorithm.micro_batch_size,
                f"must divide over the mesh's data x fsdp = {data_ways} devices",
            )
    return config


# ---------------------------------------------------------------------------------------------- presets


def cpu_demo() -> TrainConfig:
    """The embedded CPU default: a tiny policy, the local CPU task family, local tools; ~10 min on 2 cores.

    A tiny Qwen3 and a small BPE (phrase tokens for the constant prompt text, 3-digit number tokens), an SFT warm
    start on 4096 scripted demonstrations, half of which ask the expensive expert, who knows only 30% of the
    towns and sums; then GRPO under a cost-preferring preference (outcome 1, cost 1), sampling at temperature
    0.7. GRPO learns to leave the expert for python and search, so accuracy rises and cost falls together
    (+14 to +19 points and -54 to -61% in three seeds, notes/DEMO_NOTES.md). Learning rates are a tiny
    model's, not the paper's 1e-6.
    """
    return TrainConfig(
        name="cpu-demo",
        steps=40,
        model=ModelConfig(source="qwen3-tiny"),
        # Temperature 0.7: at 1.0 the policy's copy errors (a digit, a name) hide the routing lesson.
        rollout=RolloutConfig(max_slots=32, max_new_tokens=64, max_context=512, temperature=0.7),
        env=EnvConfig(max_turns=3, concurrency=32, preference_sampling="fixed", expert_coverage=0.3),
        reward=RewardConfig(fixed_outcome=1.0, fixed_cost=1.0, fixed_latency=0.0),
        # 2000 SFT steps on 4096 demonstrations: the tiny policy learns to copy numbers and names only after
        # ~600 steps (the NLL drops from ~0.4 to ~0.05). After 1200 steps the search route's accuracy varied
        # from 0.1 to 0.6 by seed; after 2000 it was 0.7-0.9 in three seeds.
        algorithm=AlgorithmConfig(prompts_per_step=16, group_size=4, micro_batch_size=8, kl_coef=1e-3,
                                  sft_steps=2000, sft_lr=5e-3, sft_batch_size=16, sft_demonstrations=4096,
                                  sft_expert_share=0.5),
        optimizer=OptimizerConfig(lr=3e-4, schedule="constant"),  # 1e-3 lost accuracy (demo notes)
        checkpoint=CheckpointConfig(every_steps=10, keep=2),
    )


def test_tiny() -> TrainConfig:
    """A step in seconds, for tests. Latency weight 0 so the reward never reads the wall clock."""
    return TrainConfig(
        name="test-tiny",
        steps=2,
        model=ModelConfig(source="qwen3-tiny"),
        rollout=RolloutConfig(max_slots=8, max_new_tokens=48, max_context=1024),
        env=EnvConfig(max_turns=2, concurrency=8, preference_sampling="fixed"),
        # Cost and latency weights 0: both read the wall clock (sandbox seconds), which would break bitwise resume.
        # No group filter, so even an untrained policy's (all-zero) rewards make an update.
        reward=RewardConfig(fixed_cost=0.0, fixed_latency=0.0, min_group_std=0.0, drop_invalid_answers=False),
        algorithm=AlgorithmConfig(prompts_per_step=2, group_size=4, micro_batch_size=8),
        optimizer=OptimizerConfig(lr=1e-3),
        checkpoint=CheckpointConfig(every_steps=1, keep=2, async_save=False),
        logging=LoggingConfig(progress_bar=False),
    )


def orchestrator_8b() -> TrainConfig:
    """The paper's recipe: Qwen3-8B, SGLang rollouts, 16 prompts x 8 rollouts, lr 1e-6, 30 turns."""
    return TrainConfig(
        name="orchestrator-8b",
        steps=1000,
        model=ModelConfig(source="Qwen/Qwen3-8B", compute_dtype="bfloat16", remat="full"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        rollout=RolloutConfig(
            engine="sglang",
            endpoints_file="endpoints/sglang.json",
            max_new_tokens=8768,
            max_context=32768,
            weight_sync_dir="/dev/shm/orchestra_jax_weights",
        ),
        env=EnvConfig(tasks="data/toolscale.jsonl", max_turns=30, prompt_mode="context", concurrency=256,
                      tools_file="endpoints/tools.json"),
        algorithm=AlgorithmConfig(prompts_per_step=16, group_size=8, micro_batch_size=8),
        optimizer=OptimizerConfig(lr=1e-6, weight_decay=0.01, grad_clip=1.0),
        checkpoint=CheckpointConfig(every_steps=10, keep=5),
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "cpu-demo": cpu_demo,
    "test-tiny": test_tiny,
    "orchestrator-8b": orchestrator_8b,
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------- JSON round trip


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Rebuild a (nested) frozen dataclass from plain values, naming any unknown or missing field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{f.name}")
        elif not _matches(value, hint):
            raise ConfigError(f"{where}.{f.name}: bad value {value!r} (expected {_describe(hint)})")
        kwargs[f.name] = value
    return cls(**kwargs)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(h) for h in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write config JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(to_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_config(path: str | os.PathLike) -> TrainConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    return from_dict(TrainConfig, data, where=str(path))
