"""The training loop, the one place that sequences the plain values the other modules produce:

rollouts (episodes on the engine) -> reward -> filters and advantages -> packed batch -> reference log-probs
-> update (the jitted step) -> weight sync -> logs -> checkpoint.

Determinism: step s plays tasks [s P, (s + 1) P) of a seeded stream with request seeds derived from
(seed, step, task, rollout, turn), so a resumed run replays exactly what an uninterrupted one would have done
(bitwise on CPU when the reward does not read the wall clock, as with `test-tiny`). SIGTERM finishes the
current step (RL or SFT warm start), saves a checkpoint and returns 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from orchestra_jax.config import CheckpointConfig, ConfigError, TrainConfig, save_config, to_dict
from orchestra_jax.env.episode import ToolPool, run_episodes
from orchestra_jax.env.tasks_cpu import demonstrations
from orchestra_jax.models.hf_io import load_pretrained
from orchestra_jax.models.transformer import init_params
from orchestra_jax.parallel.mesh import batch_ways, make_mesh
from orchestra_jax.rl import environment as envlib
from orchestra_jax.rl.batching import Sample, pack, split_minibatches
from orchestra_jax.rl.checkpoint import Checkpointer, CheckpointError
from orchestra_jax.rl.losses import PolicyLossConfig, kl_estimate
from orchestra_jax.rl.metrics import rollout_metrics
from orchestra_jax.rl.optimizer import make_optimizer, make_schedule
from orchestra_jax.rl.reward import group_advantages, keep_mask, multi_objective_reward
from orchestra_jax.rl.sft import samples_from_trajectories, sft_train
from orchestra_jax.rl.train_step import LogprobFn, StepSettings, TrainStep, make_train_step
from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.rollout.sglang_client import SGLangEngine
from orchestra_jax.rollout.weight_sync import WeightSyncError
from orchestra_jax.runlog import RunDir, TensorBoardLogger, create_run_dir, lock_run_dir, write_jsonl_atomic

TERMINATED = 143


@dataclass
class Stop:
    """Set by the SIGTERM handler; the loops (SFT and RL) check it between steps."""

    requested: bool = False


@contextlib.contextmanager
def catching_sigterm(stop: Stop) -> Iterator[Stop]:
    """While inside, SIGTERM sets `stop` instead of killing the process, so a loop can save and return."""
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "requested", True))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(Exception):
    """SIGTERM handled: what was saved, for the console."""


class RolloutFailed(RuntimeError):
    """The rollout servers failed in a way the run cannot go on from; says what was saved."""


def step_settings(config: TrainConfig, model: Any, *, sft: bool = False) -> StepSettings:
    algorithm = config.algorithm
    # SFT: unit advantages, no KL/entropy/IS terms (see sft.py for why that is the NLL gradient).
    loss = PolicyLossConfig(kl_coef=0.0, entropy_coef=0.0, tis_cap=None) if sft else PolicyLossConfig.from_algorithm(algorithm)
    return StepSettings(
        model=model,
        loss=loss,
        algorithm="grpo" if sft else algorithm.name,
        compute_dtype=config.model.compute_dtype,
        remat=config.model.remat,
        attention=config.model.attention,
        temperature=1.0 if sft else config.rollout.temperature,
        gamma=algorithm.gamma,
        gae_lambda=algorithm.gae_lambda,
        value_coef=algorithm.value_coef,
        use_reference=(not sft) and algorithm.kl_coef > 0,
    )


def rl_samples(config: TrainConfig, trajectories: list, advantages: np.ndarray, rewards: np.ndarray,
               keep: np.ndarray, ref_logprobs: list | None = None) -> list[Sample]:
    """Training samples of the kept trajectories; tokens of malformed turns lose their loss mask.
    `ref_logprobs`: per trajectory, its samples' reference log-probs (None for a trajectory not computed)."""
    out = []
    for t, (traj, adv, reward, kept) in enumerate(zip(trajectories, advantages, rewards, keep)):
        if not kept:
            continue
        for k, sample in enumerate(traj.samples):
            mask = np.asarray(sample.loss_mask, np.int32)
            if config.reward.drop_malformed_turns and any(traj.malformed_turns):
                mask = _mask_malformed_turns(mask, traj.malformed_turns, len(traj.samples) > 1, k)
            ref = ref_logprobs[t][k] if ref_logprobs is not None else None
            out.append(Sample(np.asarray(sample.token_ids, np.int32), mask, float(adv),
                              np.asarray(sample.behaviour_logprobs, np.float32), float(reward), ref))
    return out


def trajectory_kl(trajectories: list, ref_logprobs: list, estimator: str) -> np.ndarray:
    """Each rollout's KL to the reference, summed over its policy tokens: the engine's (behaviour) log-probs
    against the reference's, per-token estimates as in the loss (verl sums the same into the reward)."""
    totals = np.zeros(len(trajectories))
    for t, (traj, refs) in enumerate(zip(trajectories, ref_logprobs)):
        for sample, ref in zip(traj.samples, refs):
            mask = np.asarray(sample.loss_mask) > 0
            mask[0] = False  # token 0 has no log-prob
            behaviour = np.asarray(sample.behaviour_logprobs, np.float32)
            totals[t] += float(np.sum(np.asarray(kl_estimate(behaviour, ref, estimator))[mask]))
    return totals


def _mask_malformed_turns(mask: np.ndarray, malformed: tuple[bool, ...], per_turn: bool, index: int) -> np.ndarray:
    """Zero the runs of policy tokens that belong to malformed turns (history: the k-th run is turn k;
    context mode: sample k is turn k)."""
    if per_turn:
        return np.zeros_like(mask) if index < len(malformed) and malformed[index] else mask
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([mask, [0]])) == -1) + 1
    mask = mask.copy()
    for turn, (lo, hi) in enumerate(zip(starts, ends)):
        if turn < len(malformed) and malformed[turn]:
            mask[lo:hi] = 0
    return mask


def score(config: TrainConfig, trajectories: list, kl: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(rewards, advantages, keep) for one step's trajectories (DESIGN.md section 4). With `kl` (each rollout's
    summed KL, algorithm.kl_in_reward) the advantages are those of reward - kl_coef x KL, as verl's
    use_kl_in_reward; the rewards returned and the group filter stay the task's."""
    # Every tool any rollout had, in first-seen order: a task file's domains bring tools of their own.
    names = list(dict.fromkeys(n for t in trajectories for n in t.tool_names))
    counts = np.array([[t.tool_counts.get(n, 0) for n in names] for t in trajectories], np.float64)
    correct = np.array([t.correct for t in trajectories])
    cost = np.array([t.ledger.cost_usd for t in trajectories])
    latency = np.array([t.ledger.tool_latency_s for t in trajectories])
    preference = np.array([_preference_over(t, names) for t in trajectories])
    groups = np.array([t.group_id for t in trajectories])
    rewards = multi_objective_reward(counts, correct, cost, latency, preference, groups, mode=config.reward.mode)
    penalised = rewards if kl is None else rewards - config.algorithm.kl_coef * np.asarray(kl)
    advantages = group_advantages(penalised, groups, eps=config.reward.advantage_eps,
                                  clip=config.reward.advantage_clip, mode=config.reward.mode)
    keep = keep_mask(rewards, groups, [t.has_valid_answer for t in trajectories],
                     min_group_std=config.reward.min_group_std, drop_invalid_answers=config.reward.drop_invalid_answers,
                     mode=config.reward.mode)
    return rewards, advantages, keep


def _preference_over(traj: Any, names: list[str]) -> list[float]:
    """A rollout's [tools..., outcome, cost, latency] preference re-laid over `names` (0 for a tool it lacked)."""
    k = len(traj.tool_names)
    own = dict(zip(traj.tool_names, traj.preference[:k]))
    return [own.get(n, 0.0) for n in names] + list(traj.preference[k:])


def _trajectory_text(traj: Any, reward: float) -> str:
    lines = [f"task {traj.task_id} · correct={traj.correct} · reward={reward:.3f} · cost=${traj.ledger.cost_usd:.5f}"]
    for i, turn in enumerate(traj.turns):
        lines.append(f"**turn {i}**: `{turn.text.strip()[:400]}`")
        lines += [f"> {obs.strip()[:200]}" for obs in turn.observations]
    return "\n\n".join(lines)


# What `--resume` may change: how long the run goes on, where and how often it logs and saves, and the mesh
# (orbax restores onto new shardings). Everything else must match the run's config.json.
RESUMABLE = ("steps", "resume", "dry_run", "dry_run_compile", "run_dir", "logging", "checkpoint", "mesh", "rollout.endpoints_file")


def check_run_dir(config: TrainConfig, run: RunDir) -> None:
    """Refuse to start a new run over a directory that holds one, and to resume one under other settings."""
    holds_run = ((run.root / "init").is_dir() or (run.root / "sft_ckpt").is_dir()
                 or any(p.name.isdigit() for p in run.checkpoints.iterdir()))
    if not config.resume:
        if holds_run:
            raise ConfigError(f"run directory {run.root} already holds a run: pass --resume to continue it, or "
                              "choose another --run-dir")
        return
    if not run.config_path.is_file():
        return
    try:
        saved = json.loads(run.config_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run.config_path}: unreadable ({type(e).__name__})") from None
    for key, ours, theirs in _differences(json.loads(json.dumps(to_dict(config))), saved):  # tuples as lists
        if not any(key == r or key.startswith(r + ".") for r in RESUMABLE):
            raise ConfigError(f"--resume: {key} is {ours!r} here but {theirs!r} in {run.config_path}; resume with "
                              "the run's own settings (only steps, logging, checkpoint and mesh may change)")


def _differences(ours: dict, theirs: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, ours, theirs) for each leaf both dicts hold with different values (a field only one side
    knows is a schema change between versions, not a setting)."""
    out = []
    for key in ours.keys() & theirs.keys():
        a, b, name = ours[key], theirs[key], f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append((name, a, b))
    return sorted(out)


class Trainer:
    """Owns the run directory, the mesh, the compiled steps, the engine and the checkpointer of one run."""

    def __init__(self, config: TrainConfig, *, echo: Any = print):
        self.config, self.echo = config, echo
        self.run: RunDir = create_run_dir(config.run_dir or f"runs/{config.name}")
        self._lock = lock_run_dir(self.run)
        check_run_dir(config, self.run)  # before config.json is overwritten
        for stale in self.run.trajectories.glob(".step_*.jsonl-*"):  # a killed run's unfinished writes
            stale.unlink()
        save_config(config, self.run.config_path)
        self.env = envlib.build_environment(config, self.run.root)
        self.model = envlib.model_config(config, self.env.tokenizer)
        self.mesh = make_mesh(config.mesh)
        self.stop = Stop()

    # ---- start: SFT warm start (or its saved result), then the RL state --------------------------------------

    def initial_params(self) -> Any:
        """The source checkpoint's weights (or a seeded random init for a preset), then the SFT warm start; saved
        once as run/init (also the KL reference)."""
        init_dir = (self.run.root / "init").absolute()
        with ocp.StandardCheckpointer() as checkpointer:
            abstract = jax.eval_shape(lambda: init_params(self.model, jax.random.key(self.config.seed)))
            if init_dir.is_dir():
                try:
                    return checkpointer.restore(init_dir, abstract)
                except (FileNotFoundError, ValueError, KeyError) as e:
                    raise CheckpointError(f"{init_dir}: cannot restore ({type(e).__name__})") from None
            pretrained = envlib.pretrained_dir(self.config)
            if pretrained is not None:
                _, params = load_pretrained(pretrained, dtype="float32", mesh=self.mesh)
                self.echo(f"weights: {pretrained}")
            else:
                params = init_params(self.model, jax.random.key(self.config.seed))
            if self.config.algorithm.sft_steps > 0:
                params = self.warm_start(params)
            checkpointer.save(init_dir, params)
        shutil.rmtree(self._sft_checkpoints, ignore_errors=True)  # run/init supersedes it
        return params

    @property
    def _sft_checkpoints(self) -> Path:
        return self.run.root / "sft_ckpt"

    def warm_start(self, params: Any) -> Any:
        cfg = self.config
        tasks = envlib.demonstration_tasks(cfg, self.env)
        demo_config = envlib.episode_config(cfg, self.env, step=-1)
        demo_config = dataclasses.replace(demo_config, mode="history", max_turns=max(demo_config.max_turns, 2),
                                          max_new_tokens=max(demo_config.max_new_tokens, 96))
        trajectories = asyncio.run(
            demonstrations(tasks, self.env.tokenizer, self.env.world, catalog=self.env.catalog, seed=cfg.seed,
                           config=demo_config, expert_share=cfg.algorithm.sft_expert_share)
        )
        write_jsonl_atomic(self.run.root / "demonstrations.jsonl", [t.to_json() for t in trajectories])
        samples = samples_from_trajectories(trajectories)
        optimizer = make_optimizer(
            type(cfg.optimizer)(lr=cfg.algorithm.sft_lr, schedule="cosine", warmup_steps=max(cfg.algorithm.sft_steps // 10, 1),
                                weight_decay=cfg.optimizer.weight_decay, grad_clip=cfg.optimizer.grad_clip),
            cfg.algorithm.sft_steps,
        )
        step, state = make_train_step(step_settings(cfg, self.model, sft=True), optimizer, self.mesh, params)
        correct = sum(t.correct for t in trajectories)
        self.echo(f"sft: {len(samples)} demonstrations ({correct} correct), {cfg.algorithm.sft_steps} steps")
        # A SIGTERM mid-way saves the SFT state here; --resume goes on from it (the demonstrations are seeded,
        # so they come out the same again).
        saved = Checkpointer(self._sft_checkpoints, CheckpointConfig(every_steps=1, keep=1, async_save=False))
        start = 0
        if saved.latest_step() is not None:
            state, meta = saved.restore(state)
            start = int(meta["step"])
            self.echo(f"sft: resumed from step {start}")
        with TensorBoardLogger(self.run.tensorboard / "sft") as tb:
            if start:
                tb.restart(start)

            def on_step(i: int, metrics: dict[str, float]) -> None:
                tb.scalars({"sft/nll": metrics["nll"], "sft/grad_norm": metrics["grad_norm"]}, i)
                if i % 20 == 0 or i == cfg.algorithm.sft_steps - 1:
                    self.echo(f"sft step {i}: nll {metrics['nll']:.4f}")
                    tb.flush()

            state, history = sft_train(step, state, samples, steps=cfg.algorithm.sft_steps,
                                       batch_size=cfg.algorithm.sft_batch_size,
                                       micro_batch_size=cfg.algorithm.micro_batch_size,
                                       max_row_len=cfg.rollout.max_context, seed=cfg.seed, on_step=on_step,
                                       start=start, stop=lambda: self.stop.requested,
                                       row_multiple=batch_ways(self.mesh))
        done = start + len(history)
        if done < cfg.algorithm.sft_steps:  # stopped by SIGTERM
            if done > start:
                saved.save(done, state, {"seed": cfg.seed}, force=True)
            saved.close()
            raise _Terminated(f"SIGTERM: saved SFT step {done} of {cfg.algorithm.sft_steps}, exiting" if done else
                              "SIGTERM before the first SFT step: nothing to save, exiting")
        saved.close()
        return jax.device_get(state.params)

    # ---- the RL loop ----------------------------------------------------------------------------------------------

    @property
    def updates_per_step(self) -> int:
        return self.config.algorithm.epochs * self.config.algorithm.mini_batches

    def train(self) -> int:
        try:
            with catching_sigterm(self.stop):
                return self._train()
        except _Terminated as stopped:
            self.echo(str(stopped))
            return TERMINATED

    def _train(self) -> int:
        cfg = self.config
        params = self.initial_params()
        if self.stop.requested:  # SIGTERM during the warm start's last step: run/init holds it
            raise _Terminated("SIGTERM: saved the warm start, exiting")
        optimizer = make_optimizer(cfg.optimizer, cfg.steps * self.updates_per_step)
        settings = step_settings(cfg, self.model)
        # The frozen reference in the compute dtype, which its forward casts every weight to anyway (a copy: the
        # step donates params).
        compute = jnp.dtype(settings.compute_dtype or jnp.float32)
        reference = jax.tree.map(lambda x: jnp.array(x, compute), params) if settings.use_reference else None
        train_step, state = make_train_step(settings, optimizer, self.mesh, params)
        if reference is not None:
            reference = jax.device_put(reference, train_step.shardings.params)
        logprob_fn = LogprobFn(settings, self.mesh, train_step.shardings.params) if settings.use_reference else None
        checkpointer = Checkpointer(self.run.checkpoints, cfg.checkpoint)
        start = 0
        if cfg.resume and checkpointer.latest_step() is not None:
            state, meta = checkpointer.restore(state)
            start = int(meta["step"])
            self.echo(f"resumed from step {start}" if start < cfg.steps else
                      f"nothing to do: {self.run.root} is already at step {start} of {cfg.steps}")
            self._note_stretched_schedule(meta.get("config", {}).get("steps"), start)
        elif cfg.resume:
            self.echo(f"no checkpoint in {self.run.checkpoints}: starting at step 0")
        tasks = envlib.task_stream(cfg, self.env, cfg.steps * cfg.algorithm.prompts_per_step)
        try:
            return asyncio.run(self._loop(state, train_step, logprob_fn, reference, checkpointer, tasks, start,
                                          make_schedule(cfg.optimizer, cfg.steps * self.updates_per_step)))
        finally:
            checkpointer.close()

    def _note_stretched_schedule(self, saved_steps: int | None, start: int) -> None:
        """A cosine schedule spans the run's --steps, so resuming with another --steps bends it mid-run: say so."""
        cfg = self.config
        if cfg.optimizer.schedule != "cosine" or saved_steps in (None, cfg.steps) or start >= cfg.steps:
            return
        at = start * self.updates_per_step
        before = make_schedule(cfg.optimizer, saved_steps * self.updates_per_step)(at)
        after = make_schedule(cfg.optimizer, cfg.steps * self.updates_per_step)(at)
        self.echo(f"note: --steps {cfg.steps} (the run began with {saved_steps}) stretches the cosine schedule: "
                  f"the learning rate at step {start} goes from {float(before):.3g} to {float(after):.3g}, so the "
                  "run is not the one an uninterrupted --steps run would have been")

    async def _loop(self, state, train_step: TrainStep, logprob_fn, reference, checkpointer: Checkpointer,
                    tasks: list, start: int, schedule) -> int:
        cfg = self.config
        engine = await self._engine(state.params, start)
        pool = ToolPool()
        tb = TensorBoardLogger(self.run.tensorboard)
        if start:  # TensorBoard then drops what a killed run logged after its last checkpoint
            tb.restart(start + 1)
        progress = _progress(cfg, start)
        pending = None
        scalars: dict[str, float] = {}
        try:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                rollout = pending if pending is not None else asyncio.ensure_future(self._rollouts(engine, pool, tasks, step))
                trajectories = await rollout
                timings = {"rollout": time.perf_counter() - t0}
                pending = None
                if cfg.algorithm.off_policy_overlap and step + 1 < cfg.steps:
                    pending = asyncio.ensure_future(self._rollouts(engine, pool, tasks, step + 1))
                state, scalars, texts = await self._update(state, train_step, logprob_fn, reference, trajectories,
                                                           timings, step)
                meta = {"seed": cfg.seed, "data_position": (step + 1) * cfg.algorithm.prompts_per_step,
                        "config": to_dict(cfg)}
                t = time.perf_counter()
                try:
                    await engine.update_weights(jax.tree.map(jnp.copy, state.params), version=str(step + 1))
                except WeightSyncError as e:  # the servers went away: keep the step, then stop
                    checkpointer.save(step + 1, state, meta, force=True)
                    checkpointer.wait()
                    raise RolloutFailed(f"weight sync after step {step + 1} failed ({str(e).splitlines()[0]}); "
                                        f"step {step + 1} is saved: --resume once the servers are back") from None
                timings["sync"] = time.perf_counter() - t
                t = time.perf_counter()
                checkpointer.save(step + 1, state, meta, force=self.stop.requested or step + 1 == cfg.steps)
                timings["checkpoint"] = time.perf_counter() - t
                scalars.update({f"time/{k}_s": v for k, v in timings.items()})
                scalars["time/step_s"] = time.perf_counter() - t0
                scalars["optim/lr"] = float(schedule(step * self.updates_per_step))
                self._log(tb, step + 1, scalars, texts, trajectories)
                progress.update(1)
                progress.set_postfix(acc=f"{scalars['rollout/accuracy']:.2f}", reward=f"{scalars['reward/mean']:.3f}",
                                     cost=f"{scalars['rollout/cost_usd']:.5f}")
                if self.stop.requested:
                    checkpointer.wait()
                    if checkpointer.latest_step() != step + 1:  # SIGTERM came after the save was decided
                        checkpointer.save(step + 1, state, meta, force=True)
                        checkpointer.wait()
                    self.echo(f"SIGTERM: saved step {step + 1}, exiting")
                    return TERMINATED
            checkpointer.wait()
            self.echo(_finished(self.run, cfg.steps, scalars))
            return 0
        finally:
            if pending is not None:
                pending.cancel()
            if isinstance(engine, SGLangEngine):
                await engine.close()
            progress.close()
            tb.close()

    async def _engine(self, params: Any, start: int):
        """The embedded JAX sampler on this process's params, or a client of the endpoints file's SGLang servers,
        which first get the policy's weights (they may hold another step's, or another model's values)."""
        r = self.config.rollout
        if r.engine == "embedded":
            return EmbeddedEngine(self.model, jax.tree.map(jnp.copy, params), max_slots=r.max_slots,
                                  max_context=r.max_context, decode_chunk=r.decode_chunk, weight_version=str(start),
                                  detokenize=self.env.tokenizer.decode, prefix_reuse=False, seed=self.config.seed)
        try:
            engine = SGLangEngine.from_endpoints_file(r.endpoints_file, config=self.model, sync_root=r.weight_sync_dir,
                                                      verbose=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"rollout.endpoints_file: {str(e).splitlines()[0]}") from None
        try:
            await engine.update_weights(params, version=str(start))
        except WeightSyncError as e:
            await engine.close()
            raise ConfigError(f"rollout.endpoints_file {r.endpoints_file}: the first weight sync failed: "
                              f"{str(e).splitlines()[0]}") from None
        self.echo(f"rollouts: {len(engine.servers)} SGLang server(s) from {r.endpoints_file}, "
                  f"weights synced in {engine.last_sync.total_s:.1f} s")
        return engine

    async def _rollouts(self, engine, pool, tasks: list, step: int) -> list:
        cfg = self.config
        p = cfg.algorithm.prompts_per_step
        step_tasks = [tasks[(step * p + i) % len(tasks)] for i in range(p)]
        return await run_episodes(engine, self.env.tokenizer, self.env.catalog, step_tasks,
                                  envlib.episode_config(cfg, self.env, step), group_size=cfg.algorithm.group_size,
                                  concurrency=cfg.env.concurrency, prices=self.env.prices, pool=pool,
                                  setup=self.env.setup)

    async def _update(self, state, train_step, logprob_fn, reference, trajectories, timings, step):
        cfg = self.config
        timings["logprob"] = 0.0
        ref, kl = None, None
        # GRPO with the KL in the reward needs every rollout's KL before scoring; PPO takes it per token into
        # GAE's rewards instead (_optimize), so it needs the kept rollouts' only, like the KL in the loss.
        if logprob_fn is not None and cfg.algorithm.kl_in_reward and cfg.algorithm.name == "grpo":
            ref = await self._reference_logprobs(logprob_fn, reference, trajectories, timings)
            kl = trajectory_kl(trajectories, ref, cfg.algorithm.kl_estimator)
        rewards, advantages, keep = score(cfg, trajectories, kl)
        scalars = rollout_metrics(trajectories, rewards, advantages, keep)
        scalars["time/tools_s"] = float(sum(t.ledger.tool_latency_s for t in trajectories))
        if kl is not None:
            scalars["reward/kl_penalty"] = float(cfg.algorithm.kl_coef * np.mean(kl))
        if logprob_fn is not None and ref is None:  # the kept rollouts' only
            ref = await self._reference_logprobs(logprob_fn, reference,
                                                 [t if k else None for t, k in zip(trajectories, keep)], timings)
        samples = rl_samples(cfg, trajectories, advantages, rewards, keep, ref)
        scalars["train/samples"] = float(len(samples))
        if samples:
            state, metrics, tokens, seconds = await self._optimize(state, train_step, samples, timings, step)
            scalars.update({f"train/{k}": v for k, v in metrics.items()})
            scalars["train/tokens_per_s"] = tokens / max(seconds, 1e-9)
        else:
            timings["update"] = 0.0
            scalars["train/skipped_empty"] = 1.0
        texts = [(_trajectory_text(t, r)) for t, r in zip(trajectories[: cfg.logging.trajectories_per_step], rewards)]
        return state, scalars, (texts, rewards, advantages)

    async def _reference_logprobs(self, logprob_fn, reference, trajectories: list, timings: dict) -> list:
        """The frozen reference's log-probs of every sample of each trajectory (None: skip that one), in one
        pass over them, whatever the epochs and mini-batches."""
        cfg = self.config
        chosen = [s for t in trajectories if t is not None for s in t.samples]
        t0 = time.perf_counter()
        per_sample = iter([])
        if chosen:
            batch = pack([Sample(np.asarray(s.token_ids, np.int32), np.asarray(s.loss_mask, np.int32), 0.0)
                          for s in chosen], micro_batch_size=cfg.algorithm.micro_batch_size,
                         max_row_len=cfg.rollout.max_context, row_multiple=batch_ways(self.mesh))
            values = await asyncio.to_thread(logprob_fn, reference, batch.arrays)
            per_sample = iter(batch.per_sample(values))
        timings["logprob"] += time.perf_counter() - t0
        return [None if t is None else [next(per_sample) for _ in t.samples] for t in trajectories]

    async def _optimize(self, state, train_step, samples, timings, step):
        """epochs x mini_batches updates on one step's samples; old log-probs are the engine's (behaviour)
        ones, so every update's ratio is against the policy that sampled. Metrics are means over updates."""
        cfg = self.config
        algorithm = cfg.algorithm
        rng = np.random.default_rng((cfg.seed, step))
        timings["update"] = 0.0
        totals: dict[str, float] = {}
        tokens = padded = truncated = updates = 0
        for _ in range(algorithm.epochs):
            for chunk in split_minibatches(len(samples), algorithm.mini_batches, rng):
                batch = pack([samples[i] for i in chunk], micro_batch_size=algorithm.micro_batch_size,
                             max_row_len=cfg.rollout.max_context, aggregation=algorithm.loss_aggregation,
                             one_per_row=algorithm.name == "ppo", row_multiple=batch_ways(self.mesh))
                arrays = dict(batch.arrays)
                if algorithm.kl_in_reward and algorithm.name == "ppo" and "ref_logprobs" in arrays:
                    # verl's token-level KL penalty: each policy token's reward is lowered by kl_coef x its KL
                    kl = kl_estimate(arrays["behaviour_logprobs"], arrays["ref_logprobs"], algorithm.kl_estimator)
                    arrays["rewards"] = arrays["rewards"] - algorithm.kl_coef * np.asarray(kl) * arrays["mask"]
                t = time.perf_counter()
                state, metrics = await asyncio.to_thread(train_step, state, arrays)
                timings["update"] += time.perf_counter() - t
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
                tokens += batch.num_tokens
                padded += int(np.prod(batch.shape))
                truncated += batch.truncated
                updates += 1
        metrics = {k: v / updates for k, v in totals.items()}
        metrics.update(padding_fraction=1.0 - tokens / float(padded), truncated=float(truncated // algorithm.epochs),
                       updates=float(updates))  # each epoch sees every sample once
        return state, metrics, tokens, timings["update"] + timings["logprob"]

    def _log(self, tb: TensorBoardLogger, step: int, scalars: dict, texts, trajectories) -> None:
        cfg = self.config
        text_list, rewards, advantages = texts
        if step % cfg.logging.every_steps == 0 or step == cfg.steps:
            tb.scalars(scalars, step)
            tb.histogram("reward/histogram", rewards, step)
            tb.histogram("reward/advantages", advantages, step)
            if text_list:
                tb.text("trajectories", "\n\n---\n\n".join(text_list), step)
            tb.flush()
        rows = [{**t.to_json(), "reward": float(r), "advantage": float(a)}
                for t, r, a in zip(trajectories, rewards, advantages)]
        write_jsonl_atomic(self.run.trajectories / f"step_{step}.jsonl", rows)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(config: TrainConfig, start: int):
    if not config.logging.progress_bar:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start, desc="rl", unit="step", dynamic_ncols=True)


def _finished(run: RunDir, steps: int, scalars: dict[str, float]) -> str:
    """The run's last line on the console: where it is, its last step's headline figures, how to look at it."""
    last = ""
    if scalars:  # empty when a resumed run had no step left to do
        last = (f"; last step: accuracy {scalars['rollout/accuracy']:.3f}, reward {scalars['reward/mean']:.3f}, "
                f"cost ${scalars['rollout/cost_usd']:.6f} an episode")
    return (f"done: step {steps} in {run.root}{last}. Curves: orchestra-jax inspect curves {run.root} "
            f"(or tensorboard --logdir {run.tensorboard})")


def train(config: TrainConfig, *, echo: Any = print) -> int:
    """Run (or resume) a whole training job; returns the process exit status (0, or 143 after SIGTERM)."""
    return Trainer(config, echo=echo).train()

