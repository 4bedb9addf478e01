"""Device script: the fused log-prob Pallas kernels (Triton lowering) on a GPU, against a plain bf16 matmul of
the same shape measured in the same run.

    python -m orchestra_jax.kernels.gpu_bench [--tokens 4096 8192] [--hidden 1024 4096] [--out DIR]

First it checks the Pallas kernels against the chunked XLA reference on a small case on the device (a wrong
kernel is never timed). Then, per (T, H): the matmul h·W (bf16 in, bf16 out) gives the achievable TFLOP/s;
the forward kernel does the same 2·T·H·V flops, the backward kernels 4 more matmul-equivalents (two logit
recomputes, ∂h, ∂W). Reported: achieved TFLOP/s, counting executed flops, and its fraction of the matmul's.
Also timed for context: naive XLA (full logits) and the chunked XLA reference, forward and forward+backward.
Prints a table, a markdown block for notes/DEVICE_NOTES.md, and JSON (also written under --out).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from orchestra_jax.kernels import logprob_math as lm
from orchestra_jax.kernels import logprob_pallas as pk
from orchestra_jax.kernels.logprob import fused_logprob
from orchestra_jax.kernels.logprob_reference import naive_logprob


@dataclasses.dataclass(frozen=True)
class GpuBenchArgs:
    tokens: tuple[int, ...] = (4096, 8192)
    hidden: tuple[int, ...] = (1024, 4096)
    vocab: int = 151936
    block_t: int = 64
    block_v: int = 128
    block_k: int = 64
    repeats: int = 5
    """timed runs per measurement (median reported) after two warm-ups"""
    skip_naive: bool = False
    """skip the naive XLA baseline (its [T, V] logits need T·V·4 bytes several times over)"""
    out: str | None = None
    """directory for gpu_bench.json"""
    interpret: bool = False
    """dry run of this script on CPU with the kernels in interpret mode (tiny shapes only; timings meaningless)"""


def _time(fn: Callable, *args, repeats: int) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _case(tokens, hidden, vocab, seed):
    k_h, k_w, k_t, k_c = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k_h, (tokens, hidden), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(k_w, (hidden, vocab), jnp.float32) * hidden**-0.5).astype(jnp.bfloat16)
    targets = jax.random.randint(k_t, (tokens,), 0, vocab)
    coef = jax.random.normal(k_c, (tokens,), jnp.float32)
    return h, w, targets, coef


def _impl(args: GpuBenchArgs) -> str:
    return "interpret" if args.interpret else "pallas"


def check_parity(args: GpuBenchArgs) -> float:
    """Max relative error of Pallas (fp32 inputs) vs the XLA reference, over log-probs, entropies, ∂h, ∂W."""
    h, w, targets, coef = _case(*((20, 32, 300) if args.interpret else (200, 256, 1000)), seed=1)
    h, w = h.astype(jnp.float32), w.astype(jnp.float32)

    def value_and_grads(impl):
        def loss(h, w):
            logp, ent = fused_logprob(h, w, targets, temperature=0.8, return_entropy=True, impl=impl)
            return jnp.sum(logp * coef) + jnp.sum(ent), (logp, ent)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
        return (*aux, *grads)

    got, want = value_and_grads(_impl(args)), value_and_grads("reference")
    errors = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(got, want)]
    if not all(np.isfinite(errors)) or bool(jnp.any(got[0] > 0)):
        raise SystemExit(f"gpu_bench: Pallas output is not finite or has positive log-probs: {errors}")
    return max(errors)


def bench_shape(args: GpuBenchArgs, tokens: int, hidden: int) -> dict:
    h, w, targets, coef = _case(tokens, hidden, args.vocab, seed=tokens + hidden)
    blocks = dict(block_t=args.block_t, block_v=args.block_v, block_k=args.block_k, interpret=args.interpret)
    flops = 2.0 * tokens * hidden * args.vocab

    def kernel_fwd(h, w, targets):
        return lm.finish_stats(pk.pallas_stats(h, w, targets, temperature=1.0, **blocks))

    def kernel_bwd(h, w, targets, lse, mean_z, coef):
        return pk.pallas_grads(
            h, w, targets, lse, mean_z, coef, jnp.zeros_like(coef), temperature=1.0, **blocks
        )

    _, _, lse, mean_z = jax.jit(kernel_fwd)(h, w, targets)

    def fwd_bwd(fn):
        return jax.value_and_grad(lambda h, w: jnp.sum(fn(h, w, targets) * coef), argnums=(0, 1))

    row = {"tokens": tokens, "hidden": hidden, "vocab": args.vocab, "dtype": "bfloat16", **blocks}
    row["matmul_s"] = _time(lambda h, w: jnp.dot(h, w), h, w, repeats=args.repeats)
    row["pallas_fwd_s"] = _time(kernel_fwd, h, w, targets, repeats=args.repeats)
    row["pallas_bwd_s"] = _time(kernel_bwd, h, w, targets, lse, mean_z, coef, repeats=args.repeats)
    pallas_api = lambda h, w, t: fused_logprob(h, w, t, impl=_impl(args))
    reference_api = lambda h, w, t: fused_logprob(h, w, t, impl="reference")
    row["pallas_api_fwd_bwd_s"] = _time(fwd_bwd(pallas_api), h, w, repeats=args.repeats)
    row["reference_fwd_s"] = _time(lambda h, w: reference_api(h, w, targets), h, w, repeats=args.repeats)
    row["reference_fwd_bwd_s"] = _time(fwd_bwd(reference_api), h, w, repeats=args.repeats)
    if not args.skip_naive:
        row["naive_fwd_s"] = _time(lambda h, w: naive_logprob(h, w, targets), h, w, repeats=args.repeats)
        row["naive_fwd_bwd_s"] = _time(fwd_bwd(naive_logprob), h, w, repeats=args.repeats)
    row["matmul_tflops"] = flops / row["matmul_s"] / 1e12
    row["pallas_fwd_tflops"] = flops / row["pallas_fwd_s"] / 1e12
    row["pallas_bwd_tflops"] = 4 * flops / row["pallas_bwd_s"] / 1e12
    row["pallas_fwd_fraction_of_matmul"] = row["pallas_fwd_tflops"] / row["matmul_tflops"]
    row["pallas_bwd_fraction_of_matmul"] = row["pallas_bwd_tflops"] / row["matmul_tflops"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(GpuBenchArgs, args=argv)
    if jax.default_backend() != "gpu" and not args.interpret:
        print(f"gpu_bench: needs a GPU backend, found {jax.default_backend()!r}", file=sys.stderr)
        return 2
    device = jax.devices()[0].device_kind
    print(f"device: {device}; jax {jax.__version__}")
    parity = check_parity(args)
    print(f"parity (Pallas vs XLA reference, fp32, small case): max rel err {parity:.2e}")
    rows = []
    head = (
        f"{'T':>6} {'H':>5} | {'matmul TF/s':>11} | {'fwd TF/s':>8} {'frac':>5} | {'bwd TF/s':>8} {'frac':>5}"
    )
    head += f" | {'pallas f+b s':>12} {'ref f+b s':>9} {'naive f+b s':>11}"
    print(head)
    for tokens in args.tokens:
        for hidden in args.hidden:
            row = bench_shape(args, tokens, hidden)
            row.update(device=device, parity_max_rel_err=parity)
            rows.append(row)
            naive = row.get("naive_fwd_bwd_s", float("nan"))
            print(
                f"{tokens:>6} {hidden:>5} | {row['matmul_tflops']:>11.1f} | {row['pallas_fwd_tflops']:>8.1f} "
                f"{row['pallas_fwd_fraction_of_matmul']:>5.2f} | {row['pallas_bwd_tflops']:>8.1f} "
                f"{row['pallas_bwd_fraction_of_matmul']:>5.2f} | {row['pallas_api_fwd_bwd_s']:>12.4f} "
                f"{row['reference_fwd_bwd_s']:>9.4f} {naive:>11.4f}",
                flush=True,
            )
    print(json.dumps(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
