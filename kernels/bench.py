"""Benchmark: naive (full logits + jax.nn.log_softmax) against the fused log-prob, forward and forward+backward.

Peak memory is XLA's own account of the compiled program (arguments + outputs + temporaries − aliased), so it
does not depend on what else the machine runs; time is the best of `repeats` runs after one warm-up. Both
variants of a row are measured in the same run, so their ratio is meaningful on a busy machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from orchestra_jax.kernels.logprob import fused_logprob
from orchestra_jax.kernels.logprob_reference import naive_logprob


@dataclasses.dataclass(frozen=True)
class LogprobBenchArgs:
    """Flags of `orchestra-jax bench logprob`."""

    tokens: tuple[int, ...] = (4096, 8192)
    """token counts T to measure"""
    hidden: tuple[int, ...] = (1024, 4096)
    """hidden sizes H to measure"""
    vocab: int = 151936
    """vocabulary size V (Qwen3's padded embedding by default)"""
    repeats: int = 2
    """timed runs per cell (the best is reported)"""
    warmup: int = 1
    """untimed runs per cell before timing (compilation is always done ahead, untimed)"""
    time_runs: bool = True
    """run and time the programs; --no-time-runs reports compiled peak memory only (cheap at any size)"""
    dtype: str = "float32"
    """input dtype of hidden and the LM head: float32 or bfloat16"""
    impl: str = "auto"
    """fused implementation: auto, pallas, interpret or reference"""
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")
    """which passes to measure"""
    json_out: str | None = None
    """also write the JSON rows to this file"""


def _fwd(logprob_fn: Callable) -> Callable:
    def run(hidden_TH, w_HV, targets_T, coef_T):
        return logprob_fn(hidden_TH, w_HV, targets_T)

    return run


def _fwd_bwd(logprob_fn: Callable) -> Callable:
    def loss(hidden_TH, w_HV, targets_T, coef_T):
        return jnp.sum(logprob_fn(hidden_TH, w_HV, targets_T) * coef_T)

    return jax.value_and_grad(loss, argnums=(0, 1))


def peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries − aliased bytes, from XLA's memory analysis of a compiled program."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    )


def _measure(fn: Callable, args: Sequence[jax.Array], config: LogprobBenchArgs) -> tuple[int, int, float]:
    """(peak bytes, temporary bytes, best seconds or nan when not timed)."""
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    compiled = jax.jit(fn).lower(*shapes).compile()
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    if not config.time_runs:
        return peak_bytes(compiled), temp, float("nan")
    for _ in range(config.warmup):
        jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(config.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return peak_bytes(compiled), temp, best


def _input_shapes(tokens: int, hidden: int, vocab: int, dtype: str) -> tuple[jax.ShapeDtypeStruct, ...]:
    return (
        jax.ShapeDtypeStruct((tokens, hidden), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.float32),
    )


def _inputs(tokens: int, hidden: int, vocab: int, dtype: str, seed: int) -> tuple[jax.Array, ...]:
    @jax.jit
    def make(key):
        k_h, k_w, k_t, k_c = jax.random.split(key, 4)
        hidden_TH = jax.random.normal(k_h, (tokens, hidden), jnp.float32).astype(dtype)
        w_HV = (jax.random.normal(k_w, (hidden, vocab), jnp.float32) * hidden**-0.5).astype(dtype)
        targets_T = jax.random.randint(k_t, (tokens,), 0, vocab)
        coef_T = jax.random.normal(k_c, (tokens,), jnp.float32)
        return hidden_TH, w_HV, targets_T, coef_T

    return make(jax.random.key(seed))


def run_benchmark(args: LogprobBenchArgs, emit: Callable[[str], None] = print) -> list[dict]:
    """Measure every (T, H, pass) cell; print a table as rows complete; return the JSON rows."""
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose float32 or bfloat16")
    if bad := [p for p in args.passes if p not in ("fwd", "fwd+bwd")]:
        raise ValueError(f"--passes {bad}: choose from fwd, fwd+bwd")
    if args.repeats < 1 or args.warmup < 0 or args.vocab < 1 or min(args.tokens + args.hidden, default=0) < 1:
        raise ValueError("--repeats, --vocab, --tokens and --hidden must be positive")
    fused = lambda h, w, t: fused_logprob(h, w, t, impl=args.impl)
    header = f"{'T':>6} {'H':>5} {'pass':>8} | {'naive GiB':>9} {'fused GiB':>9} {'mem x':>6} | "
    header += f"{'naive s':>8} {'fused s':>8} {'time x':>6}"
    emit(
        f"logprob benchmark: V={args.vocab}, dtype={args.dtype}, backend={jax.default_backend()}, impl={args.impl}"
    )
    emit(header)
    emit("-" * len(header))
    rows = []
    for tokens in args.tokens:
        for hidden in args.hidden:
            shapes = _input_shapes(tokens, hidden, args.vocab, args.dtype)
            inputs = (
                _inputs(tokens, hidden, args.vocab, args.dtype, seed=len(rows)) if args.time_runs else shapes
            )
            for name in args.passes:
                wrap = _fwd if name == "fwd" else _fwd_bwd
                naive_mem, naive_temp, naive_s = _measure(wrap(naive_logprob), inputs, args)
                fused_mem, fused_temp, fused_s = _measure(wrap(fused), inputs, args)
                row = {
                    "tokens": tokens,
                    "hidden": hidden,
                    "vocab": args.vocab,
                    "dtype": args.dtype,
                    "impl": args.impl,
                    "backend": jax.default_backend(),
                    "pass": name,
                    "naive_peak_bytes": naive_mem,
                    "fused_peak_bytes": fused_mem,
                    "memory_ratio": fused_mem / naive_mem,
                    "naive_temp_bytes": naive_temp,
                    "fused_temp_bytes": fused_temp,
                    "naive_s": naive_s if args.time_runs else None,
                    "fused_s": fused_s if args.time_runs else None,
                    "time_ratio": fused_s / naive_s if args.time_runs else None,
                }
                rows.append(row)
                emit(
                    f"{tokens:>6} {hidden:>5} {name:>8} | {naive_mem / 2**30:>9.3f} {fused_mem / 2**30:>9.3f} "
                    f"{row['memory_ratio']:>6.3f} | {naive_s:>8.3f} {fused_s:>8.3f} {fused_s / naive_s:>6.2f}"
                )
    emit("mem x = fused/naive peak bytes (XLA memory analysis); time x = fused/naive best wall time")
    emit(json.dumps(rows))
    if args.json_out:
        _write_json(args.json_out, rows)
    return rows


def _write_json(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        json.dump(rows, f, indent=2)
    os.replace(f.name, path)
