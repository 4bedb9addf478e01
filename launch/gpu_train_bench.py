"""Train-step throughput and MFU on one accelerator, for Qwen3-0.6B and Qwen3-1.7B shapes (random weights).

    python launch/gpu_train_bench.py [--models qwen3-0.6b qwen3-1.7b] [--batch 8] [--seq-len 2048] [--steps 5]
    python launch/gpu_train_bench.py --models qwen3-0.6b --override MODULE.CONSTANT=VALUE   # a what-if run
    python launch/gpu_train_bench.py --models qwen3-0.6b --versus MODULE.CONSTANT=VALUE     # both, in turns

The step is the RL train step the trainer runs (GRPO loss, AdamW, fp32 params with bf16 compute, full remat by
default), with the trainer's choices of attention (cuDNN on a GPU) and log-prob path (the chunked XLA reference);
the flags swap each for the alternatives. In the same run it measures the matmul ceiling: a bf16
[n, n] x [n, n] matmul's achieved FLOP/s. It prints one JSON line per model with tokens/s, model FLOP/s,
MFU against that measured ceiling and against the card's dense bf16 peak (when the card is known), and the
process's kernel seconds and minor page faults per step (medians; on the CPU each step faults in the fresh
temporary buffer XLA maps for it). With --versus the same process also builds the step with those constants
set and times the two step by step in turns, the order flipping every pair; the row adds that step's time and
the median ratio over the pairs, and its own kernel seconds and page faults (the `versus_` fields).

FLOPs per trained token: TransformerConfig.train_flops_per_token (6 x the matmul params + attention over the
keys a causal mask keeps, as MaxText counts). The row also gives MFU with attention over every key (PaLM's
6N + 12LHQT, as nanoGPT and torchtitan report it), for comparing with those. Remat recomputation is not counted as
useful work (MFU, not HFU).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import resource
import sys
import time

import jax
import numpy as np
import optax

from orchestra_jax.config import MeshConfig
from orchestra_jax.models.transformer import init_params
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import make_mesh
from orchestra_jax.rl.batching import Sample, pack
from orchestra_jax.rl.bench_train import matmul_flops
from orchestra_jax.rl.losses import PolicyLossConfig
from orchestra_jax.rl.plan import PEAK_FLOPS
from orchestra_jax.rl.train_step import StepSettings, make_train_step


def matmul_ceiling(n: int = 8192, repeats: int = 20) -> float:
    """Achieved FLOP/s of a bf16 n x n x n matmul on this device (best of `repeats` timed calls). On the CPU its
    output is f32, as in the step's matmuls: XLA's CPU accumulates a bf16-output matmul in bf16, at half speed."""
    return matmul_flops(n, "bfloat16", repeats, out_dtype="float32" if jax.default_backend() == "cpu" else None)


def apply_overrides(overrides: list[str]) -> list[tuple]:
    """Set module constants for a what-if run, e.g. `orchestra_jax.kernels.logprob_reference.CHUNK_ELEMENTS=
    67108864`; each is checked to exist, and the values are Python literals. Returns what `restore` needs to
    put the old values back."""
    previous = []
    for item in overrides:
        target, _, value = item.partition("=")
        module_name, _, attr = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            if not hasattr(module, attr) or not value:
                raise AttributeError(f"{module_name} has no constant {attr}")
            new = ast.literal_eval(value)
        except (ImportError, AttributeError, ValueError, SyntaxError) as e:
            restore(previous)
            raise SystemExit(f"--override {item!r}: {e}") from None
        previous.append((module, attr, getattr(module, attr)))
        setattr(module, attr, new)
    return previous


def restore(previous: list[tuple]) -> None:
    for module, attr, value in reversed(previous):
        setattr(module, attr, value)


def build(name: str, args: argparse.Namespace):
    """(model, step, state, batch): the trainer's step on one device for a preset, random weights and tokens."""
    model = get_preset(name)
    params = init_params(model, jax.random.key(0), dtype="float32")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    settings = StepSettings(model=model, loss=PolicyLossConfig(kl_coef=0.0), compute_dtype="bfloat16",
                            remat=args.remat, logprob_impl=args.logprob_impl,
                            attention=args.attention)
    step, state = make_train_step(settings, optax.adamw(1e-6, weight_decay=0.01), mesh, params)
    rng = np.random.default_rng(0)
    length = args.seq_len // args.samples_per_row
    samples = [Sample(rng.integers(0, model.vocab_size, length), np.ones(length, np.int32), float(rng.normal()))
               for _ in range(args.batch * args.micro_batches * args.samples_per_row)]
    packed = pack(samples, micro_batch_size=args.batch, max_row_len=args.seq_len, min_row_len=args.seq_len,
                  row_multiple=1)  # one accelerator
    if packed.arrays["tokens"].shape[:2] != (args.micro_batches, args.batch):
        raise SystemExit(f"{len(samples)} samples of {length} tokens packed into {packed.arrays['tokens'].shape[:2]}"
                         f" micro-batches x rows, not {args.micro_batches} x {args.batch}")
    return model, step, state, packed.arrays


def trained_tokens(args: argparse.Namespace) -> int:
    """Tokens with a target: each sample's last token predicts nothing."""
    length = args.seq_len // args.samples_per_row
    return args.batch * args.micro_batches * args.samples_per_row * (length - 1)


def model_flops_per_step(model, args: argparse.Namespace, *, causal: bool = True) -> float:
    return model.train_flops_per_token(args.seq_len // args.samples_per_row, causal=causal) * trained_tokens(args)


def _timed(step, state, batch) -> tuple:
    """(state, metrics, seconds, (kernel seconds, minor page faults)): the last two are the process's own while
    the step ran. On the CPU, XLA maps its temporary buffer afresh at every step, and each page is faulted in."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    state, metrics = step(state, batch)  # returns floats: the device work is finished
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return state, metrics, seconds, (after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt)


def bench(name: str, args: argparse.Namespace, ceiling: float, peak: float | None) -> dict:
    """One model's row. With --versus, a second step built and compiled under those overrides takes turns with
    this one, step by step, and the row adds its step time and the median over pairs of this / that."""
    model, step, state, batch = build(name, args)
    state, metrics, compile_s, _ = _timed(step, state, batch)  # compile + first step
    sides = {"this": {"step": step, "state": state, "metrics": metrics, "times": [], "kernel": []}}
    if args.versus:
        previous = apply_overrides(args.versus)  # on while the step is built and traced
        try:
            _, other_step, other_state, _ = build(name, args)
            other_state, other_metrics = _timed(other_step, other_state, batch)[:2]
            sides["versus"] = {"step": other_step, "state": other_state, "metrics": other_metrics, "times": [],
                               "kernel": []}
        finally:
            restore(previous)
    for i in range(args.steps):
        for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):  # the order flips every pair
            run = sides[side]
            run["state"], run["metrics"], seconds, kernel = _timed(run["step"], run["state"], batch)
            run["times"].append(seconds)
            run["kernel"].append(kernel)
    metrics, times, kernel = sides["this"]["metrics"], sides["this"]["times"], sides["this"]["kernel"]
    step_s = float(np.median(times))
    tokens = trained_tokens(args)
    model_flops = model_flops_per_step(model, args) / step_s
    extra = {}
    if args.versus:
        other = sides["versus"]
        extra = {"versus": args.versus, "versus_step_s": round(float(np.median(other["times"])), 4),
                 "versus_speedup": round(float(np.median(np.array(times) / np.array(other["times"]))), 3),
                 "versus_loss_finite": bool(np.isfinite(other["metrics"]["loss"])),
                 **{f"versus_{k}": v for k, v in _kernel_figures(other["kernel"]).items()}}
    return {
        "model": name, "params": model.num_params(), "device": jax.devices()[0].device_kind,
        "batch": args.batch, "micro_batches": args.micro_batches, "seq_len": args.seq_len,
        "samples_per_row": args.samples_per_row, "remat": args.remat,
        "attention": args.attention, "logprob_impl": args.logprob_impl, "overrides": args.override,
        "compile_s": round(compile_s, 1), "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops": round(model_flops / 1e12, 1), "matmul_ceiling_tflops": round(ceiling / 1e12, 1),
        "mfu_vs_measured_ceiling": round(model_flops / ceiling, 3),
        "mfu_vs_spec_peak": round(model_flops / peak, 3) if peak else None,
        "mfu_dense_attention_vs_measured_ceiling": round(
            model_flops_per_step(model, args, causal=False) / step_s / ceiling, 3),
        "loss_finite": bool(np.isfinite(metrics["loss"])), "skipped": metrics["skipped"],
        **_kernel_figures(kernel), **extra,
    }


def _kernel_figures(kernel: list[tuple[float, int]]) -> dict:
    """Medians over a side's steps of the kernel time and the minor page faults `_timed` counted."""
    return {"kernel_s_per_step": round(float(np.median([k[0] for k in kernel])), 3),
            "page_faults_per_step": int(np.median([k[1] for k in kernel]))}


def add_step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--samples-per-row", type=int, default=1,
                        help="packed samples (segments) per row, each seq_len / this long, as RL batches pack them")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--logprob-impl", default="auto", choices=["auto", "pallas", "reference"])
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    parser.add_argument("--override", action="append", default=[], metavar="MODULE.CONSTANT=VALUE",
                        help="set a module constant first (a what-if run; repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--versus", action="append", default=[], metavar="MODULE.CONSTANT=VALUE",
                        help="also build the step with this constant set, and time the two in turns (repeatable)")
    add_step_args(parser)
    args = parser.parse_args(argv)
    apply_overrides(args.override)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)
    ceiling = matmul_ceiling(args.matmul_n)
    print(json.dumps({"device": kind, "backend": jax.default_backend(), "matmul_ceiling_tflops": round(ceiling / 1e12, 1),
                      "spec_peak_tflops": peak and peak / 1e12}), flush=True)
    for name in args.models:
        try:
            print(json.dumps(bench(name, args, ceiling, peak)), flush=True)
        except Exception as e:  # one model failing (e.g. out of memory) must not hide the other's figures
            print(json.dumps({"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
