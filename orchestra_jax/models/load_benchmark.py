"""`orchestra-jax bench load`: time and peak host RSS of load_pretrained on a synthetic ~1B checkpoint.

The checkpoint (Qwen3-shaped: hidden 2048, 16 layers, vocab 151936, about 1.1B params) is written tensor by
tensor, then loaded in a fresh Python process so that its peak RSS (VmHWM) covers only the load plus the
interpreter and jax. The issue's bar: peak RSS below 1.5x the checkpoint's bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Literal

import numpy as np

from orchestra_jax.models import hf_io
from orchestra_jax.models.safetensors_io import write_safetensors
from orchestra_jax.models.transformer_config import TransformerConfig, get_preset


@dataclasses.dataclass(frozen=True)
class LoadBenchArgs:
    """Write a synthetic Qwen3-shaped checkpoint (about 1.1B params at 16 layers) and time its load."""

    layers: int = 16
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Checkpoint dtype, and the dtype it is loaded in."""
    workdir: str | None = None
    """Where the temporary checkpoint goes (default: the system temp dir); removed afterwards."""


def synthetic_config(num_layers: int = 16) -> TransformerConfig:
    return dataclasses.replace(get_preset("qwen3-1.7b"), num_layers=num_layers)


def write_synthetic_checkpoint(config: TransformerConfig, out_dir: pathlib.Path, dtype: str = "bfloat16",
                               max_shard_bytes: int = 1 << 30) -> int:  # fmt: skip
    """Random weights in HF layout, written one tensor at a time (never the whole model in memory)."""
    import jax.numpy as jnp

    from orchestra_jax.models import transformer

    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = transformer.param_shapes(config)
    entries = [(hf_io.TOP_NAMES["embed"], hf_io.hf_shape("embed", shapes["embed"]))]
    for layer in range(config.num_layers):
        for key in hf_io.LAYER_NAMES:
            if key in shapes["layers"]:
                entries.append((hf_io.hf_name(key, layer), hf_io.hf_shape(key, shapes["layers"][key][1:])))
    entries.append((hf_io.TOP_NAMES["final_norm"], (config.hidden_size,)))
    if not config.tie_word_embeddings:
        entries.append((hf_io.TOP_NAMES["lm_head"], (config.vocab_size, config.hidden_size)))
    # One random block tiled over every tensor: the bytes are incompressible enough and writing stays disk-bound.
    block = (np.random.default_rng(0).random(1 << 20, dtype=np.float32) * 0.02 - 0.01).astype(np_dtype)
    shapes_by_name = dict(entries)

    def produce(name: str) -> np.ndarray:
        return np.resize(block, shapes_by_name[name])

    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = np_dtype.itemsize * int(np.prod(shape))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / file, [(n, np_dtype, s) for n, s in shard], produce)
        weight_map.update({n: file for n, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    (out_dir / "config.json").write_text(json.dumps(dict(config.to_hf_config(), torch_dtype=dtype)))
    return total


# VmHWM, not getrusage: ru_maxrss survives fork+exec and would report the parent's peak (the writer's).
_CHILD = """
import json, sys, time
import jax
from orchestra_jax.models import load_pretrained

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

jax.numpy.zeros(1).block_until_ready()
base = status("VmRSS")
start = time.perf_counter()
config, params = load_pretrained(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(params)
seconds = time.perf_counter() - start
peak = status("VmHWM")
n = sum(x.size for x in jax.tree.leaves(params))
print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": base, "params": int(n)}))
"""


def measure_load(path: pathlib.Path, dtype: str) -> dict[str, Any]:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("XLA_FLAGS", None)  # one host device: no fake-device copies
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), dtype], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"load subprocess failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(num_layers: int = 16, dtype: str = "bfloat16", workdir: str | None = None) -> dict[str, Any]:
    """Write the synthetic checkpoint, load it in a child process, and return the figures."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-load-") as tmp:
        path = pathlib.Path(tmp) / "ckpt"
        start = time.perf_counter()
        nbytes = write_synthetic_checkpoint(synthetic_config(num_layers), path, dtype)
        write_s = time.perf_counter() - start
        figures = measure_load(path, dtype)
    figures.update(checkpoint_bytes=nbytes, write_seconds=write_s, rss_ratio=figures["peak_rss"] / nbytes)
    return figures


def run_benchmark(args: LoadBenchArgs) -> int:
    if args.layers < 1:
        raise ValueError(f"--layers {args.layers}: must be at least 1")
    f = run(args.layers, args.dtype, args.workdir)
    gib = 1024**3
    print(f"checkpoint: {f['params'] / 1e9:.3f}B params, {f['checkpoint_bytes'] / gib:.2f} GiB {args.dtype} "
          f"(written in {f['write_seconds']:.1f} s)")  # fmt: skip
    print(f"load_pretrained: {f['seconds']:.2f} s, peak RSS {f['peak_rss'] / gib:.2f} GiB "
          f"(jax baseline {f['baseline_rss'] / gib:.2f} GiB), peak/checkpoint = {f['rss_ratio']:.2f} (bar: < 1.5)")  # fmt: skip
    print(json.dumps(f))
    return 0
