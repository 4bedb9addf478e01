"""`orchestra-jax bench rollout`: embedded-sampler decode speed next to transformers `generate`, and sync time.

Both sides run greedy decoding of the same weights (ours exported with models.save_pretrained, loaded by
transformers) in the same process, timed in turn within each repeat. Decode rate = batch × (new_tokens − 1) /
(time for new_tokens − time for one token), so prefill and time-to-first-token are not counted in it; TTFT is
reported on its own. The engine's jitted decode calls and model steps per decoded token are printed too (a chunk
may run a few steps past the last token; they are in the timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np

from orchestra_jax import models
from orchestra_jax.models.transformer_config import TransformerConfig
from orchestra_jax.rollout.engine import GenerateRequest, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine

# A ~7M-parameter Qwen3 shape: big enough that the matmuls matter, small enough for a 2-core CPU.
BENCH_SMALL = TransformerConfig(
    family="qwen3", vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=8,
    num_kv_heads=4, head_dim=32, rope_theta=1e6, tie_word_embeddings=True, qk_norm=True, eos_token_ids=(),
)  # fmt: skip
# A synthetic ~1B Qwen3 shape for the weight-sync figure (random weights, bfloat16).
SYNTHETIC_1B = TransformerConfig(
    family="qwen3", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=18, num_heads=16,
    num_kv_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=False, qk_norm=True, eos_token_ids=(),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RolloutBenchArgs:
    model: str = "bench-small"
    """'bench-small' (~7M Qwen3 shape) or a models preset name (random weights)."""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_tokens: int = 32
    new_tokens: int = 64
    transformers: bool = True
    """Also time transformers `generate` (torch CPU) on the same weights."""
    sync_135m: bool = True
    """Time a weight sync (export + /update_weights_from_disk on a loopback server) for a SmolLM2-135M shape."""
    sync_1b: bool = False
    """Also time the sync of a synthetic ~1B model (bfloat16; needs ~8 GB of free memory)."""
    repeats: int = 5
    """Timed runs per figure; the fastest counts (shared CPUs are noisy)."""
    seed: int = 0
    decode_chunk: int = 16
    """Decode steps per jitted call of the embedded engine (1: one step per call)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The weights' dtype, on both sides (ours multiply in it with float32 accumulation)."""


def _config(name: str) -> TransformerConfig:
    return BENCH_SMALL if name == "bench-small" else models.get_preset(name)


def _prompts(rng: np.random.Generator, batch: int, length: int, vocab: int) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in rng.integers(0, vocab, size=length)) for _ in range(batch)]


def _decode_rate(tokens: int, full_s: float, first_s: float) -> float:
    """Decoded tokens per second of the decode phase alone; NaN when timing noise swamps it (full <= first)."""
    return tokens / (full_s - first_s) if full_s > first_s else float("nan")


def jax_timer(
    config: TransformerConfig,
    params: Any,
    prompts: list,
    new_tokens: int,
    decode_chunk: int,
    loop: asyncio.AbstractEventLoop,
) -> tuple[Callable[[int], float], dict[str, float]]:
    """(timed, per_token) for the embedded engine, compiled: timed(n) is the wall time of greedy generation of n
    tokens for every prompt (run on `loop`); per_token the engine's {'calls', 'steps'} per decoded token of one
    request."""
    engine = EmbeddedEngine(
        config, params, max_slots=len(prompts), max_context=len(prompts[0]) + new_tokens + 1, prefix_reuse=False,
        decode_chunk=decode_chunk,
    )  # fmt: skip

    def timed(n: int) -> float:
        sp = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        requests = [GenerateRequest(p, sp, f"b{i}") for i, p in enumerate(prompts)]
        start = time.perf_counter()
        loop.run_until_complete(engine.generate(requests))
        return time.perf_counter() - start

    before = dict(engine.stats)
    timed(new_tokens)  # compiles prefill and decode
    per_token = {k: (engine.stats[f"decode_{k}"] - before[f"decode_{k}"]) / (new_tokens - 1)
                 for k in ("calls", "steps")}  # fmt: skip
    return timed, per_token


def transformers_timer(model_dir: str, prompts: list, dtype: str = "float32") -> Callable[[int], float]:
    """timed(n): wall time of transformers `generate` (torch, CPU, greedy) of n tokens for every prompt."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    input_ids = torch.tensor(prompts, dtype=torch.long)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return time.perf_counter() - start

    timed(2)
    return timed


def side_by_side(
    timers: dict[str, Callable[[int], float]], batch: int, new_tokens: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """{name: (decode tokens/s, time to first token)}, the sides timed in turn within each repeat (so a slow
    spell of a shared machine hits both), the fastest of the repeats counting for each."""
    first = {name: [] for name in timers}
    full = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timed in timers.items():
            first[name].append(timed(1))
            full[name].append(timed(new_tokens))
    return {
        name: (_decode_rate(batch * (new_tokens - 1), min(full[name]), min(first[name])), min(first[name]))
        for name in timers
    }


def prefix_reuse(
    config: TransformerConfig, params: Any, episodes: int = 4, turns: int = 4
) -> dict[str, float]:
    """Prefill tokens and wall time of multi-turn episodes (each turn's prompt = the previous prompt + its
    completion + a 48-token tool response), with and without reusing a finished turn's KV."""
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    first = [tuple(int(t) for t in rng.integers(0, config.vocab_size, size=160)) for _ in range(episodes)]
    responses = [[tuple(int(t) for t in rng.integers(0, config.vocab_size, size=48)) for _ in range(turns)]
                 for _ in range(episodes)]  # fmt: skip
    context = 160 + turns * (16 + 48) + 1

    async def run_all(reuse: bool) -> tuple[int, float]:
        engine = EmbeddedEngine(config, params, max_slots=episodes, max_context=context, prefix_reuse=reuse)

        async def episode(e: int) -> None:
            prompt = first[e]
            for turn in range(turns):
                [c] = await engine.generate([GenerateRequest(prompt, sp, f"{e}-{turn}")])
                prompt = prompt + c.output_ids + responses[e][turn]

        await asyncio.gather(*(episode(e) for e in range(episodes)))  # compile
        engine.stats["prefill_tokens"] = 0
        engine.flush_cache()
        start = time.perf_counter()
        await asyncio.gather(*(episode(e) for e in range(episodes)))
        return engine.stats["prefill_tokens"], time.perf_counter() - start

    with_tokens, with_s = asyncio.run(run_all(True))
    without_tokens, without_s = asyncio.run(run_all(False))
    return {
        "prefill_with": with_tokens,
        "prefill_without": without_tokens,
        "wall_with": with_s,
        "wall_without": without_s,
    }


def sync_time(config: TransformerConfig, dtype: str) -> Any:
    """Export + the HTTP update handshake against an in-process `serve` of the same shape -> SyncReport."""
    import socket
    import threading

    import uvicorn

    from orchestra_jax.rollout.server import ServedModel, create_app
    from orchestra_jax.rollout.sglang_client import SGLangEngine

    params = models.init_params(config, jax.random.key(0), dtype=dtype)
    engine = EmbeddedEngine(config, params, max_slots=1, max_context=16)
    served = ServedModel(
        engine, None, "bench", "bench", load_weights=lambda p: models.load_pretrained(p, dtype=dtype)
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    new_params = jax.tree.map(lambda x: x * 0.5, params)
    try:
        with tempfile.TemporaryDirectory(prefix="orchestra-jax-sync-") as root:

            async def go():
                client = SGLangEngine(
                    [f"http://127.0.0.1:{sock.getsockname()[1]}"],
                    config=config,
                    sync_root=root,
                    verbose=False,
                )
                try:
                    await client.update_weights(new_params, "bench-1")
                    return client.last_sync
                finally:
                    await client.close()

            return asyncio.run(go())
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def check_args(args: RolloutBenchArgs) -> TransformerConfig:
    """The benchmark model's config; ValueError naming the bad flag."""
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes {args.batch_sizes}: give one or more sizes >= 1")
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1 or args.decode_chunk < 1:
        raise ValueError("--new-tokens must be >= 2, --prompt-tokens, --repeats and --decode-chunk >= 1")
    try:
        return _config(args.model)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None


def run(args: RolloutBenchArgs) -> int:
    config = check_args(args)
    rng = np.random.default_rng(args.seed)
    params = models.init_params(config, jax.random.key(args.seed), dtype=args.dtype)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"model {args.model}: {n_params / 1e6:.1f}M params, {args.dtype}, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, greedy; {jax.device_count()} {jax.default_backend()} device(s); "
          f"decode chunk {args.decode_chunk}")  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="orchestra-jax-bench-") as tmp,
        contextlib.closing(asyncio.new_event_loop()) as loop,
    ):
        model_dir = str(models.save_pretrained(config, params, f"{tmp}/model")) if args.transformers else None
        print(f"{'batch':>5}  {'jax tok/s':>10}  {'jax TTFT s':>10}  {'calls/tok':>9}  {'steps/tok':>9}  "
              f"{'hf tok/s':>9}  {'ratio':>6}")  # fmt: skip
        for batch in args.batch_sizes:
            prompts = _prompts(rng, batch, args.prompt_tokens, config.vocab_size)
            timers = {}
            timers["jax"], per_token = jax_timer(
                config, params, prompts, args.new_tokens, args.decode_chunk, loop
            )
            if model_dir is not None:
                timers["hf"] = transformers_timer(model_dir, prompts, args.dtype)
            rates = side_by_side(timers, batch, args.new_tokens, args.repeats)
            rate, ttft = rates["jax"]
            row = f"{batch:>5}  {rate:>10.1f}  {ttft:>10.3f}  {per_token['calls']:>9.3f}  {per_token['steps']:>9.3f}"
            if model_dir is not None:
                hf_rate = rates["hf"][0]
                row += f"  {hf_rate:>9.1f}  {rate / hf_rate:>5.2f}x"
            print(row, flush=True)
    reuse = prefix_reuse(config, params)
    saved = 1 - reuse["prefill_with"] / reuse["prefill_without"]
    print(f"prefix reuse, 4 episodes x 4 turns: prefilled {reuse['prefill_with']} tokens instead of "
          f"{reuse['prefill_without']} ({saved:.0%} saved); wall {reuse['wall_with']:.2f}s vs "
          f"{reuse['wall_without']:.2f}s", flush=True)  # fmt: skip
    syncs = ([("smollm2-135m", models.get_preset("smollm2-135m"), "float32")] if args.sync_135m else []) + (
        [("synthetic-1b", SYNTHETIC_1B, "bfloat16")] if args.sync_1b else []
    )
    for name, sync_config, dtype in syncs:
        report = sync_time(sync_config, dtype)
        print(f"sync {name} ({dtype}): {report.summary()}", flush=True)
    return 0
