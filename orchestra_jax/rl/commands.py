"""Library side of the `train`, `sft` and `inspect` subcommands (the CLI only parses flags and calls these)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax

from orchestra_jax.config import CheckpointConfig, ConfigError, OptimizerConfig, TrainConfig, save_config
from orchestra_jax.models.tokenizer import Tokenizer
from orchestra_jax.models.transformer import init_params
from orchestra_jax.models.transformer_config import PRESETS as MODEL_PRESETS
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import batch_ways, make_mesh
from orchestra_jax.rl.checkpoint import Checkpointer, load_params, param_count, params_digest
from orchestra_jax.rl.optimizer import make_optimizer
from orchestra_jax.rl.sft import load_demonstrations, sft_train
from orchestra_jax.rl.train_step import make_train_step
from orchestra_jax.runlog import TensorBoardLogger, create_run_dir, lock_run_dir


def checkpoint_summary(run_dir: str | Path) -> dict:
    """Latest step, parameter count and SHA-256 over every parameter array of a run (or its ckpt/ folder)."""
    root = Path(run_dir)
    directory = root / "ckpt" if (root / "ckpt").is_dir() else root
    step, params = load_params(directory)
    return {"directory": str(directory), "step": step, "params": param_count(params), "sha256": params_digest(params)}


def _sft_inputs(config: TrainConfig, data: str, tokenizer_dir: str | None) -> tuple:
    """The model config and the checked demonstrations, shared by a run and its dry run."""
    source = config.model.source
    if source not in MODEL_PRESETS:
        raise ConfigError(f"model.source: sft starts from a model preset, got {source!r}")
    vocab = Tokenizer.from_file(tokenizer_dir).vocab_size if tokenizer_dir else None
    model = get_preset(source, vocab_size=vocab)
    return model, load_demonstrations(data, vocab_size=model.vocab_size)


def _sft_run_dir(config: TrainConfig) -> str:
    return config.run_dir or f"runs/{config.name}-sft"


def sft_plan(config: TrainConfig, data: str, tokenizer_dir: str | None) -> str:
    """`sft --dry-run`: read and check the demonstrations, then describe the run without initialising params."""
    model, samples = _sft_inputs(config, data, tokenizer_dir)
    tokens = sum(len(s.token_ids) for s in samples)
    a = config.algorithm
    return "\n".join([
        f"sft plan for {config.name!r}: {config.steps} steps, batch {a.sft_batch_size}, lr {a.sft_lr} (cosine)",
        f"  data: {data} ({len(samples)} samples, {tokens} tokens)",
        f"  model: {config.model.source} ({model.num_params()} params, vocabulary {model.vocab_size})",
        f"  run dir: {_sft_run_dir(config)} (not created by a dry run)",
    ])


def run_sft(config: TrainConfig, data: str, tokenizer_dir: str | None, *, echo=print) -> dict:
    """Train `config.model.source` (a preset) on a JSONL of demonstrations for `config.steps` steps at
    `algorithm.sft_lr`; saves the result as an orbax checkpoint under the run directory. SIGTERM saves the step
    reached and stops ("terminated" in the summary); --resume goes on from the run's checkpoint."""
    from orchestra_jax.rl.trainer import check_run_dir

    model, samples = _sft_inputs(config, data, tokenizer_dir)
    run = create_run_dir(_sft_run_dir(config))
    with contextlib.closing(lock_run_dir(run)):
        check_run_dir(config, run)  # no new run over an old one; --resume with the run's own settings
        checkpointer = Checkpointer(run.checkpoints, dataclasses.replace(CheckpointConfig(), async_save=False))
        with contextlib.closing(checkpointer):
            return _sft_run(config, model, samples, data, run, checkpointer, echo)


def _sft_run(config: TrainConfig, model, samples, data: str, run, checkpointer: Checkpointer, echo) -> dict:
    from orchestra_jax.rl.trainer import Stop, catching_sigterm, step_settings

    save_config(config, run.config_path)
    optimizer = make_optimizer(
        OptimizerConfig(lr=config.algorithm.sft_lr, schedule="cosine", warmup_steps=max(config.steps // 10, 1),
                        weight_decay=config.optimizer.weight_decay, grad_clip=config.optimizer.grad_clip),
        config.steps,
    )
    mesh = make_mesh(config.mesh)
    step, state = make_train_step(step_settings(config, model, sft=True), optimizer, mesh,
                                  init_params(model, jax.random.key(config.seed)))
    start = 0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        start = int(meta["step"])
        echo(f"resumed from step {start}")
    with catching_sigterm(Stop()) as stop, TensorBoardLogger(run.tensorboard) as tb:
        if start:
            tb.restart(start + 1)

        def on_step(i: int, metrics: dict) -> None:
            tb.scalars({"sft/nll": metrics["nll"], "sft/grad_norm": metrics["grad_norm"]}, i + 1)
            if i % 10 == 0 or i + 1 == config.steps:
                echo(f"sft step {i + 1}/{config.steps}: nll {metrics['nll']:.4f}")

        state, history = sft_train(step, state, samples, steps=config.steps,
                                   batch_size=config.algorithm.sft_batch_size,
                                   micro_batch_size=config.algorithm.micro_batch_size,
                                   max_row_len=config.rollout.max_context, seed=config.seed, on_step=on_step,
                                   start=start, stop=lambda: stop.requested, row_multiple=batch_ways(mesh))
    done = start + len(history)
    if history:
        meta = {"seed": config.seed, "data_position": 0, "sft_data": str(data)}
        checkpointer.save(done, state, meta, force=True)
    summary = {"run_dir": str(run.root), "steps": done, "demonstrations": len(samples)}
    if history:
        summary.update(first_nll=history[0]["nll"], last_nll=history[-1]["nll"])
    if done < config.steps:
        summary["terminated"] = True
        echo(f"SIGTERM: saved step {done} of {config.steps}, exiting" if done else
             "SIGTERM before the first step: nothing to save, exiting")
    echo(json.dumps(summary))
    return summary
