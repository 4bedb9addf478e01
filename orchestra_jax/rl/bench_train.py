"""`orchestra-jax bench train`: train-step tokens/s of our jitted step next to a PyTorch reference step.

Both sides get the same weights (a random transformers model, saved and loaded by models.load_pretrained),
the same batch of token ids, and do the same work: forward, backward of the mean token NLL, one AdamW update,
on the CPU, with float32 params and optimizer state. PyTorch's step runs in a process of its own (bench_torch:
beside our JAX step it ran 10-15 % slower than alone). Each side first runs `warmup` untimed steps (PyTorch's step
takes a few to reach its steady speed). The sides then take turns in blocks (`rounds` of them each: ours,
PyTorch, ours, PyTorch), so a slow spell of this shared machine lands on both sides rather than one; a block is at
least `repeats` steps and at least `min_seconds` of them. A side's step time is the median over all its blocks'
steps, and each round's own ratio is printed as the spread. Activations are float32 on both sides, or with
--compute-dtype bfloat16 ours are bf16 (matmuls accumulating in f32) and PyTorch's step runs under bf16
autocast, its own mixed-precision recipe. Our side is the RL train step with unit advantages (whose gradient is
the NLL's, see sft.py), so the number measures the step training actually runs. Timings exclude the first
(compiling) call and each block's first (warm-up) step. Within a block a side runs its steps back to back: taking
turns step by step slowed our step by up to 40% (fp32 135M: 89.8 vs 124-133 tok/s).

The same run measures each framework's matmul ceiling (an n x n x n matmul in the compute dtype, accumulating
in f32; PyTorch's in its worker) and prints each step's model FLOP/s (TransformerConfig.train_flops_per_token)
against it, and the bound it implies: were our step as fast as our matmul ceiling, it could run at most
jax ceiling / PyTorch step FLOP/s times the PyTorch step.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orchestra_jax.config import MeshConfig
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import make_mesh
from orchestra_jax.rl.batching import Sample, pack
from orchestra_jax.rl.bench_torch import TorchReference, best_flops, timings
from orchestra_jax.rl.losses import PolicyLossConfig
from orchestra_jax.rl.train_step import StepSettings, make_train_step


@dataclass(frozen=True)
class TrainBenchArgs:
    models: tuple[str, ...] = ("qwen3-tiny", "smollm2-135m")
    """Model presets (random weights). qwen3-tiny gets a 2048-id vocabulary, like the CPU demo's."""
    batch: int = 8
    seq_len: int = 256
    repeats: int = 3
    min_seconds: float = 3.0
    """In each block a side keeps stepping past `repeats` until its timed steps add up to this many seconds."""
    rounds: int = 2
    """Blocks per side, taken in turns."""
    warmup: int = 5
    """Untimed steps each side runs before its first block. PyTorch's 135M step settles only after a few steps
    (bf16, 4 x 128: 2.9, 2.6, 2.5, 2.5, 2.3 s, then about 2.2 s); timed from its second step it looked up to 1.3x
    slower than it runs."""
    torch_reference: bool = True
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Activations' dtype (params and AdamW state stay float32); PyTorch's step runs under bf16 autocast then."""
    remat: Literal["none", "full", "dots"] = "none"
    """Our step's rematerialisation. On the CPU in bf16, 'dots' and 'full' are faster than 'none': XLA upcasts each
    bf16 residual that the layer scan stacks to f32 and back, a copy of the whole stack per layer ('dots' stacks
    its activations as 16-bit bits instead, 'full' stacks only each layer's input)."""
    seed: int = 0


def _hf_model(name: str, seed: int):
    import torch
    import transformers

    model = get_preset(name, vocab_size=2048 if "tiny" in name else None)
    hf_config = model.to_hf_config()
    config_cls = transformers.AutoConfig.for_model(hf_config["model_type"], **{
        k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")
    })
    torch.manual_seed(seed)
    return model, transformers.AutoModelForCausalLM.from_config(config_cls, dtype=torch.float32)


def matmul_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5, out_dtype: str | None = None) -> float:
    """Achieved FLOP/s of a JAX n x n x n matmul on the default device (best of `repeats`): the ceiling a
    train step's model FLOP/s is read against (also launch/gpu_train_bench.py's, in bf16). `out_dtype`:
    the accumulation/output dtype (None: the input dtype)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(key_a, (n, n), dtype), jax.random.normal(key_b, (n, n), dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=out_dtype))
    return best_flops(lambda: matmul(a, b).block_until_ready(), 2 * n**3, repeats)


def bench_model(name: str, args: TrainBenchArgs) -> dict:
    """One model's row: each side's tokens/s and model GFLOP/s, the speedup and its per-round spread, and
    PyTorch's matmul ceiling measured in its worker."""
    from orchestra_jax.models import load_pretrained

    model, hf = _hf_model(name, args.seed)
    rng = np.random.default_rng(args.seed)
    ids_BT = rng.integers(0, model.vocab_size, (args.batch, args.seq_len))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        del hf
        model, params = load_pretrained(tmp)
        if not args.torch_reference:
            return _bench_sides(name, model, params, ids_BT, args, None)
        with TorchReference(tmp, ids_BT, args.compute_dtype) as reference:
            row = _bench_sides(name, model, params, ids_BT, args, reference)
            row["torch_gemm_gflops"] = round(reference.gemm_flops(2048, args.compute_dtype, 5) / 1e9, 1)
            return row


def _bench_sides(name: str, model, params, ids_BT: np.ndarray, args: TrainBenchArgs,
                 reference: TorchReference | None) -> dict:
    samples = [Sample(row, np.ones(args.seq_len, np.int32), 1.0) for row in ids_BT]
    batch = pack(samples, micro_batch_size=args.batch, max_row_len=args.seq_len, row_multiple=1)  # one device
    tokens = args.batch * (args.seq_len - 1)

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    settings = StepSettings(model=model, loss=PolicyLossConfig(kl_coef=0.0, dual_clip=None),
                            compute_dtype=args.compute_dtype, remat=args.remat)
    optimizer = optax.adamw(1e-5, weight_decay=0.01)
    step, state = make_train_step(settings, optimizer, mesh, jax.tree.map(jnp.copy, params))
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = step(holder["state"], batch.arrays)
        return metrics

    for _ in range(args.warmup):
        jax_step()
    blocks: dict[str, list[list[float]]] = {"jax": []}
    if reference is not None:
        reference.steps(args.warmup)
        blocks["torch"] = []
    for _ in range(args.rounds):
        # Each block starts with an untimed step: the first step after the other side's block ran up to 1.5x
        # slower (both ways; 135M bf16 in a /tmp probe, when both sides shared a process).
        blocks["jax"].append(timings(jax_step, args.repeats, args.min_seconds))
        if reference is not None:
            blocks["torch"].append(reference.block(args.repeats, args.min_seconds))

    step_flops = model.train_flops_per_token(args.seq_len) * tokens
    result = {"model": name, "params": model.num_params(), "batch": args.batch, "seq_len": args.seq_len,
              "compute_dtype": args.compute_dtype, "remat": args.remat, "rounds": args.rounds, "warmup": args.warmup}
    step_s = {}
    for side, side_blocks in blocks.items():
        step_s[side] = float(np.median(sum(side_blocks, [])))
        result.update({f"{side}_tokens_per_s": round(tokens / step_s[side], 1),
                       f"{side}_step_s": round(step_s[side], 3),
                       f"{side}_model_gflops": round(step_flops / step_s[side] / 1e9, 2)})
    if reference is not None:
        result["speedup"] = round(step_s["torch"] / step_s["jax"], 2)
        result["round_speedups"] = [round(float(np.median(t) / np.median(j)), 2)
                                    for j, t in zip(blocks["jax"], blocks["torch"])]
    return result


def run(args: TrainBenchArgs) -> int:
    rows = [bench_model(name, args) for name in args.models]
    nan = float("nan")
    print(f"{'model':<14} {'params':>11} {'jax tok/s':>10} {'torch tok/s':>12} {'speedup':>8} "
          f"{'jax GF/s':>9} {'torch GF/s':>11}  per round")
    for r in rows:
        spread = " ".join(f"{x:.2f}x" for x in r.get("round_speedups", []))
        print(f"{r['model']:<14} {r['params']:>11,} {r['jax_tokens_per_s']:>10.1f} "
              f"{r.get('torch_tokens_per_s', nan):>12.1f} {r.get('speedup', nan):>7.2f}x "
              f"{r['jax_model_gflops']:>9.1f} {r.get('torch_model_gflops', nan):>11.1f}  {spread}")
    summary = {"bench": "train", "batch": args.batch, "seq_len": args.seq_len, "compute_dtype": args.compute_dtype,
               "results": rows}
    if args.torch_reference:
        ceiling = {"jax": matmul_flops(2048, args.compute_dtype, 5, out_dtype="float32") / 1e9,
                   "torch": max(r["torch_gemm_gflops"] for r in rows)}
        summary["gemm_ceiling_gflops"] = {k: round(v, 1) for k, v in ceiling.items()}
        print(f"{args.compute_dtype} matmul ceiling (2048^3): jax {ceiling['jax']:.1f} GF/s, torch "
              f"{ceiling['torch']:.1f} GF/s (PyTorch's in its worker)")
        for r in rows:
            r["speedup_bound_at_jax_ceiling"] = round(ceiling["jax"] / r["torch_model_gflops"], 2)
            print(f"  {r['model']}: torch's step runs at {r['torch_model_gflops'] / r['torch_gemm_gflops']:.0%} of "
                  f"its ceiling, ours at {r['jax_model_gflops'] / ceiling['jax']:.0%}; a step at our ceiling "
                  f"would be {r['speedup_bound_at_jax_ceiling']:.2f}x torch's")
    print(json.dumps(summary))
    return 0


def check_args(args: TrainBenchArgs) -> None:
    for name in args.models:
        get_preset(name)
    if (args.batch < 1 or args.seq_len < 2 or args.repeats < 1 or args.rounds < 1 or args.min_seconds < 0
            or args.warmup < 0):
        raise ValueError(f"batch={args.batch}, seq_len={args.seq_len}, repeats={args.repeats}, rounds={args.rounds}, "
                         f"min_seconds={args.min_seconds}, warmup={args.warmup}: must be positive (seq_len >= 2, "
                         "min_seconds >= 0, warmup >= 0)")
