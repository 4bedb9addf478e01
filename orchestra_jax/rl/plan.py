"""`--dry-run`: the plan of a run, its mesh, and a memory and time estimate, without loading any weights.

Memory per device (training state sharded over fsdp x tensor): fp32 params 4 B + fp32 grads 4 B + AdamW
moments 8 B per parameter, plus the frozen reference in the compute dtype when KL is on, plus activations.
Activations are counted, not guessed: the residuals the backward of one micro-batch reads back under the
run's remat policy, traced on the device's abstract shapes (`train_step.saved_activation_bytes`), plus the
working set of the layer whose backward is running. With float32 compute this came within 15 % of XLA's own
buffer assignment on the CPU (tests/rl/test_plan.py); with bf16 XLA's CPU keeps more (some bf16 stacks in
float32), a GPU should not. Plus the [tokens, vocab-tile] log-prob working set.
Time: 6 x params x tokens FLOPs per epoch over the step's samples (+2 x, once a step, for the reference's
forward) over devices x peak x MFU.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from orchestra_jax.config import TrainConfig, to_dict
from orchestra_jax.parallel.mesh import resolve_mesh_shape

# Dense bf16 peak FLOP/s of accelerators a plan may target (vendor figures, no sparsity). The keys are
# substrings of JAX's device_kind, so launch/gpu_train_bench.py finds the card it runs on here too.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "TPU v5p": 459e12,
              "TPU v5e": 197e12, "TPU v5 lite": 197e12, "TPU v4": 275e12}
# Memory per device, GiB (vendor figures; the A100's larger model).
MEMORY_GIB = {"H100": 80, "H200": 141, "A100": 80, "L40S": 48, "TPU v5p": 95, "TPU v5e": 16, "TPU v5 lite": 16,
              "TPU v4": 32}
# Measured, not hoped for: on one H200 the Qwen3-1.7B train step ran at 35 % of this peak and the 0.6B step at
# 28 % (52 % and 41 % of a measured bf16 matmul; notes/DEVICE_NOTES.md, session 13). Larger models run larger
# matmuls, but nothing of 8B size ran, so the estimate takes the 0.6B figure, rounded down.
ASSUMED_MFU = 0.25


def estimate(config: TrainConfig, num_devices: int, accelerator: str = "H100") -> dict[str, Any]:
    # Imported here: the GPU scripts read PEAK_FLOPS on machines without the environment's packages.
    from orchestra_jax.rl import environment as envlib

    model = envlib.model_config(config, None)
    params = model.num_params()
    shape = resolve_mesh_shape(config.mesh, num_devices)
    shards = shape[1] * shape[2]
    data_ways = shape[0] * shape[1]
    compute_bytes = 2 if config.model.compute_dtype == "bfloat16" else 4
    rollouts = config.algorithm.prompts_per_step * config.algorithm.group_size
    # A typical ToolOrchestra episode fills about half its context.
    tokens_per_step = rollouts * config.rollout.max_context // 2
    rows = _device_rows(config, data_ways)
    micro_tokens = rows * config.rollout.max_context
    state_bytes = params * 16 / shards
    reference_bytes = params * compute_bytes / shards if config.algorithm.kl_coef > 0 else 0
    layers = model.num_layers
    activations = activation_bytes(config, model, rows, shape[2])
    logprob_bytes = micro_tokens * 4096 * 4
    total = state_bytes + reference_bytes + activations + logprob_bytes
    flops = (6 * config.algorithm.epochs + (2 if config.algorithm.kl_coef > 0 else 0)) * params * tokens_per_step
    seconds = flops / (num_devices * PEAK_FLOPS[accelerator] * ASSUMED_MFU)
    return {
        "model": {"source": config.model.source, "family": model.family, "params": params, "layers": layers,
                  "hidden": model.hidden_size, "vocab": model.vocab_size},
        "mesh": dict(zip(("data", "fsdp", "tensor"), shape)),
        "devices": num_devices,
        "per_step": {"rollouts": rollouts, "assumed_tokens": tokens_per_step,
                     "micro_batches": -(-rollouts // config.algorithm.micro_batch_size)},
        "memory_gib_per_device": {
            "params+grads+adam": round(state_bytes / 2**30, 2),
            "reference": round(reference_bytes / 2**30, 2),
            "activations": round(activations / 2**30, 2),
            "logprob": round(logprob_bytes / 2**30, 2),
            "total": round(total / 2**30, 2),
        },
        "update_time_s": {"accelerator": accelerator, "assumed_mfu": ASSUMED_MFU, "seconds": round(seconds, 1)},
    }


def _device_rows(config: TrainConfig, data_ways: int) -> int:
    """Rows of a micro-batch on each data-parallel device, as `pack` lays them out: one rollout a row at full
    length, and a step of fewer rollouts than the micro-batch size packs only their rows."""
    rollouts = config.algorithm.prompts_per_step * config.algorithm.group_size
    return -(-min(config.algorithm.micro_batch_size, rollouts) // data_ways)


def activation_bytes(config: TrainConfig, model: Any, rows: int, tensor_ways: int) -> int:
    """What one device holds for the backward of its `rows` of a micro-batch, full length, with the heads and
    MLP split over `tensor_ways` (where they divide)."""
    from orchestra_jax.rl.train_step import saved_activation_bytes
    from orchestra_jax.rl.trainer import step_settings

    if model.num_heads % tensor_ways == 0 and model.num_kv_heads % tensor_ways == 0:
        model = dataclasses.replace(model, num_heads=model.num_heads // tensor_ways,
                                    num_kv_heads=model.num_kv_heads // tensor_ways)
    if model.intermediate_size % tensor_ways == 0:
        model = dataclasses.replace(model, intermediate_size=model.intermediate_size // tensor_ways)
    settings = step_settings(config, model)

    def saved(remat: str, layers: int) -> int:
        layered = dataclasses.replace(settings, remat=remat, model=dataclasses.replace(model, num_layers=layers))
        return saved_activation_bytes(layered, rows, config.rollout.max_context)

    # The layer whose backward runs holds its cotangents (about two layers' residuals without remat); under
    # remat "full" it first reruns its whole forward too.
    layer = saved("none", 2) - saved("none", 1)
    return saved(settings.remat, model.num_layers) + (3 if settings.remat == "full" else 2) * layer


def describe(config: TrainConfig, num_devices: int) -> str:
    """The printable plan: the data flow, then the estimate as JSON."""
    note = ""
    asked = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
    if num_devices < 8 and asked < 0:
        note = f" (this host has {num_devices} device(s); estimated for a node of 8)"
        num_devices = 8
    elif asked > num_devices:  # every axis given: plan for the mesh asked for, not this host
        note = f" (this host has {num_devices} device(s); estimated for the {asked} the mesh asks for)"
        num_devices = asked
    est = estimate(config, num_devices)
    a, r = config.algorithm, config.rollout
    from orchestra_jax.rl import environment as envlib

    pretrained = envlib.pretrained_dir(config)
    weights = (f"those of {pretrained}" if pretrained else
               f"a random init ({config.model.source!r} names a preset here; --model.source DIR, an HF checkpoint "
               "directory, starts from its weights)")
    lines = [
        f"plan for {config.name!r}: {config.steps} steps of {a.name.upper()}",
        f"  weights: {weights}",
        f"  rollouts: {a.prompts_per_step} prompts x {a.group_size} from {config.env.tasks} "
        f"on the {r.engine} engine ({r.endpoints_file or 'in process'}), <= {config.env.max_turns} turns, "
        f"{r.max_new_tokens} new tokens a turn, context {r.max_context}",
        f"  reward: {config.reward.mode} mode, advantage clip {config.reward.advantage_clip}, "
        f"group std filter {config.reward.min_group_std}",
        f"  loss: clip {a.clip_low}/{a.clip_high}, dual clip {a.dual_clip}, KL {a.kl_estimator} x {a.kl_coef}, "
        f"entropy {a.entropy_coef}, {a.loss_aggregation}",
        f"  optimizer: AdamW lr {config.optimizer.lr} ({config.optimizer.schedule}), wd {config.optimizer.weight_decay}, "
        f"grad clip {config.optimizer.grad_clip}; params float32, compute {config.model.compute_dtype}, "
        f"remat {config.model.remat}",
        f"  weight sync: {'in memory' if r.engine == 'embedded' else 'safetensors at ' + str(r.weight_sync_dir)}",
        f"  checkpoints every {config.checkpoint.every_steps} steps, keep {config.checkpoint.keep}",
        f"  memory: {_fit(est)}",
        f"estimate (no weights loaded){note}:",
        json.dumps(est, indent=2),
    ]
    return "\n".join(lines)


def _fit(est: dict[str, Any]) -> str:
    accelerator = est["update_time_s"]["accelerator"]
    total, capacity = est["memory_gib_per_device"]["total"], MEMORY_GIB[accelerator]
    if total <= capacity:
        return f"{total} GiB a device, within one {accelerator}'s {capacity} GiB"
    return (f"{total} GiB a device, MORE than one {accelerator}'s {capacity} GiB: shard wider (--mesh.fsdp), remat "
            "more (--model.remat full), or shorten the rows (--algorithm.micro-batch-size, --rollout.max-context)")


def compiled_memory(config: TrainConfig) -> dict[str, Any]:
    """XLA's own memory analysis of the train step, compiled for this host's devices on abstract weights: a check
    of the estimate on the machine that will run it, before any weights load (only one micro-batch of zeros is
    allocated). Raises ValueError where this host lacks the mesh's devices."""
    import jax
    import numpy as np

    from orchestra_jax.models.transformer import init_params
    from orchestra_jax.parallel.mesh import batch_ways, make_mesh
    from orchestra_jax.rl import environment as envlib
    from orchestra_jax.rl.batching import Sample, pack
    from orchestra_jax.rl.optimizer import make_optimizer
    from orchestra_jax.rl.train_step import TrainStep, init_train_state, state_shardings
    from orchestra_jax.rl.trainer import step_settings

    model = envlib.model_config(config, None)
    mesh = make_mesh(config.mesh)
    settings = step_settings(config, model)
    optimizer = make_optimizer(config.optimizer, config.steps)
    state = jax.eval_shape(lambda: init_train_state(model, init_params(model, jax.random.key(0)), optimizer,
                                                    settings.algorithm))
    step = TrainStep(settings, optimizer, mesh, state_shardings(mesh, model, state, optimizer))
    # One micro-batch of full-length rollouts, packed as the trainer packs them.
    length = config.rollout.max_context
    zeros = np.zeros(length, np.float32)
    sample = Sample(np.zeros(length, np.int32), np.ones(length, np.int32), 0.0, zeros,
                    ref_logprobs=zeros if settings.use_reference else None)
    batch = pack([sample] * _device_rows(config, 1), micro_batch_size=config.algorithm.micro_batch_size,
                 max_row_len=length, row_multiple=batch_ways(mesh))
    rows = batch.shape[1]
    stats = step.lower(state, dict(batch.arrays)).compile().memory_analysis()
    sizes = {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
             "outputs": stats.output_size_in_bytes, "aliased": stats.alias_size_in_bytes}
    sizes["total"] = sizes["arguments"] + sizes["temporaries"] + sizes["outputs"] - sizes["aliased"]
    return {"devices": mesh.devices.size, "mesh": dict(mesh.shape), "rows": rows, "bytes_per_device": sizes}


def describe_compiled(config: TrainConfig) -> str:
    """`--dry-run-compile`'s lines: XLA's figures beside the estimate for the same devices."""
    import jax

    xla = compiled_memory(config)
    est = estimate(config, xla["devices"])["memory_gib_per_device"]
    gib = {k: round(v / 2**30, 2) for k, v in xla["bytes_per_device"].items()}
    return "\n".join([
        f"compiled for this host's {xla['devices']} {jax.default_backend()} device(s), mesh {xla['mesh']}, "
        f"{xla['rows']} rows of {config.rollout.max_context} tokens a micro-batch (abstract weights):",
        f"  XLA: {gib['total']} GiB a device = arguments {gib['arguments']} (params and optimizer state) + "
        f"temporaries {gib['temporaries']} (gradients, activations, working sets) + outputs {gib['outputs']} "
        f"- donated {gib['aliased']}",
        f"  the estimate for these devices: {est['total']} GiB a device",
    ])


def resolved_config_json(config: TrainConfig) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)
