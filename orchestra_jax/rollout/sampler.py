"""The embedded JAX sampler: continuous batching over a fixed set of KV-cache slots.

One asyncio task owns the engine state. Each round it moves waiting requests into free slots (prefill, batched
and padded to power-of-two buckets of rows and tokens so few shapes compile), then runs one jitted decode call
over every slot that takes up to `decode_chunk` steps, each feeding the token sampled by the one before (a
per-call cost of thread hop, dispatch and bookkeeping is paid once per chunk, not once per token). Host-side
bookkeeping then walks each row's tokens in order and decides when a request stops; tokens after a stop are
dropped. Device work runs in a worker thread so an HTTP server on the same event loop keeps answering.

KV layout (from models.init_kv_cache): K/V of the token at position p live in cache slot p of the request's
row, and a query at p sees slots <= p. So right-padding a prefill is harmless, and the last cache slot
(index max_context) is scratch: pads, idle rows and positions past the context write there, real tokens never
reach it. A row that stopped mid-chunk keeps decoding garbage for the rest of the chunk; it writes only at
positions after its last fed token, which `_release` never claims as a reusable prefix.

Prefix reuse: a finished request leaves its KV in its row. A new request whose prompt shares a prefix with a
free row's tokens takes that row and prefills only the rest (an episode's next turn extends its previous turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orchestra_jax.models import transformer
from orchestra_jax.models.transformer_config import TransformerConfig
from orchestra_jax.parallel import mesh as mesh_lib
from orchestra_jax.rollout import sampling
from orchestra_jax.rollout.engine import Completion, GenerateRequest, RequestError, check_prompt


@dataclasses.dataclass
class _Live:
    """A request on its way: where it sits and what it produced so far (host-side, mutable)."""

    request: GenerateRequest
    future: asyncio.Future
    seed_words: np.ndarray
    submitted: float
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    cached_tokens: int = 0
    aborted: bool = False


def _bucket(n: int, smallest: int, largest: int) -> int:
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class EmbeddedEngine:
    """RolloutEngine over an in-process JAX model. Create and use it inside one running event loop."""

    def __init__(
        self,
        config: TransformerConfig,
        params: Any,
        *,
        max_slots: int = 8,
        max_context: int = 1024,
        weight_version: str = "0",
        detokenize: Callable[[Sequence[int]], str] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        compute_dtype: str | None = None,
        prefix_reuse: bool = True,
        min_prefill_bucket: int = 16,
        decode_chunk: int = 16,
        seed: int | None = None,
    ):
        if decode_chunk < 1:
            raise ValueError(f"decode_chunk={decode_chunk}: must be >= 1")
        self.config = config
        # What the jitted steps see: token ids that only the host reads are dropped, so engines that differ
        # only in eos/bos share compilations.
        self._step_config = dataclasses.replace(config, eos_token_ids=(), bos_token_id=None)
        self.max_slots = max_slots
        self.max_context = max_context
        self.weight_version = weight_version
        self.detokenize = detokenize
        self.mesh = mesh
        self.prefix_reuse = prefix_reuse
        self.min_prefill_bucket = min_prefill_bucket
        self.decode_chunk = decode_chunk
        self._compute_dtype = compute_dtype
        self._rng = np.random.default_rng(seed)
        self._params = self._place_params(params)
        cache_len = max_context + 1  # + the scratch slot
        cache = transformer.init_kv_cache(
            config, max_slots, cache_len, dtype=jax.tree.leaves(self._params)[0].dtype
        )
        if mesh is not None:
            cache = jax.device_put(cache, mesh_lib.tree_shardings(mesh, transformer.kv_cache_logical_axes()))
        self._cache = cache
        self._scratch = max_context
        self._slots: list[_Live | None] = [None] * max_slots
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_slots)]  # tokens whose KV the row holds
        self._slot_used = np.zeros(max_slots)  # last release time, to evict the oldest prefix first
        self._weights_epoch = 0  # counts weight updates (a version string may repeat)
        self._slot_epoch = [0] * max_slots  # weights the row's KV was computed with
        self._pending: deque[_Live] = deque()
        self._loop_task: asyncio.Task | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._failure: str | None = None
        # decode_steps counts model steps (a chunk of k is k), decode_calls the jitted calls.
        self.stats = {
            "prefill_tokens": 0, "reused_tokens": 0, "decode_steps": 0, "decode_calls": 0, "generated_tokens": 0
        }  # fmt: skip

    # ---- the RolloutEngine interface ------------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        for request in requests:
            request.sampling.validate(f"request {request.rid!r} sampling")
            check_prompt(request, self.config.vocab_size, self.max_context)
            if request.sampling.stop and self.detokenize is None:
                raise RequestError(
                    f"request {request.rid!r}: stop strings need an engine built with a detokenizer"
                )
        loop = asyncio.get_running_loop()
        live = []
        for request in requests:
            seed = request.sampling.seed
            seed = int(self._rng.integers(0, 2**63)) if seed is None else seed
            live.append(_Live(request, loop.create_future(), sampling.seed_words(seed), time.perf_counter()))
        self._pending.extend(live)
        self._ensure_loop()
        try:
            return list(await asyncio.gather(*(item.future for item in live)))
        except asyncio.CancelledError:  # the caller gave up: free the slots instead of decoding for nobody
            for item in live:
                item.aborted = True
            self._pending = deque(p for p in self._pending if not p.aborted)
            self._finish_aborted()
            raise

    async def update_weights(self, params: Any, version: str) -> None:
        """Swap weights between decode steps. Requests in flight finish on the new weights (tagged with the
        new version); KV computed with the old weights is never reused as a prefix."""
        old = jax.tree.structure(self._params)
        if jax.tree.structure(params) != old:
            raise ValueError("update_weights: parameter tree differs from the served model's")
        for new_leaf, old_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(self._params)):
            if new_leaf.shape != old_leaf.shape:
                raise ValueError(
                    f"update_weights: a parameter of shape {new_leaf.shape} replaces {old_leaf.shape}"
                )
        self._params = self._place_params(params)
        self.weight_version = version
        self._weights_epoch += 1

    async def health(self) -> bool:
        """False once the device loop has failed (the error is in `failure`)."""
        return self._failure is None

    @property
    def failure(self) -> str | None:
        return self._failure

    # ---- control used by the HTTP server -------------------------------------------------------------------

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def abort(self, rid: str | None = None) -> int:
        """Finish matching requests (all when rid is None) with finish_reason 'abort'. Returns how many."""
        count = 0
        for item in list(self._pending) + [s for s in self._slots if s is not None]:
            if rid is None or item.request.rid == rid:
                item.aborted = True
                count += 1
        for item in [p for p in self._pending if p.aborted]:
            self._pending.remove(item)
            self._resolve(item, "abort")
        self._finish_aborted()
        return count

    def flush_cache(self) -> None:
        """Forget reusable prefixes (their KV stays in memory but no new request matches it)."""
        for slot, item in enumerate(self._slots):
            if item is None:
                self._slot_tokens[slot] = []

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots) + len(self._pending)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending or any(s is not None for s in self._slots):
                await self._running.wait()
                self._finish_aborted()
                admitted = self._admit()
                if admitted:
                    results = await asyncio.to_thread(self._run_prefill, admitted)
                    for slot, token, logprob in results:
                        self._take_token(slot, token, logprob)
                if any(s is not None for s in self._slots):
                    decoding = list(self._slots)
                    tokens_KB, logprobs_KB = await asyncio.to_thread(self._run_decode)
                    tokens_BK, logprobs_BK = tokens_KB.T.tolist(), logprobs_KB.T.tolist()
                    for slot, item in enumerate(decoding):
                        for token, logprob in zip(tokens_BK[slot], logprobs_BK[slot]):
                            if item is None or self._slots[slot] is not item:  # idle, stopped or aborted
                                break
                            self._take_token(slot, token, logprob)
        except Exception as e:  # a failed compile or device error: fail every waiter instead of hanging them
            self._failure = f"{type(e).__name__}: {e}"
            for item in list(self._pending) + [s for s in self._slots if s is not None]:
                if not item.future.done():
                    item.future.set_exception(RuntimeError(f"embedded sampler failed: {self._failure}"))
            self._pending.clear()
            self._slots = [None] * self.max_slots
            self._slot_tokens = [[] for _ in range(self.max_slots)]

    def _finish_aborted(self) -> None:
        for slot, item in enumerate(self._slots):
            if item is not None and item.aborted:
                self._release(slot, "abort")

    def _admit(self) -> list[tuple[int, _Live, int]]:
        """Move waiting requests into free rows -> [(row, request, reused prefix length)]."""
        admitted = []
        while self._pending:
            free = [s for s in range(self.max_slots) if self._slots[s] is None]
            if not free:
                break
            item = self._pending.popleft()
            prompt = item.request.prompt_ids
            slot = max(free, key=lambda s: self._reuse_score(s, prompt))
            reuse = self._reuse_score(slot, prompt)[0]
            self._slots[slot] = item
            item.cached_tokens = reuse
            self._slot_tokens[slot] = list(prompt)
            self._slot_epoch[slot] = self._weights_epoch  # a request spanning an update is never reused
            admitted.append((slot, item, reuse))
        return admitted

    def _reuse_score(self, slot: int, prompt: Sequence[int]) -> tuple[int, float]:
        """(reusable prefix length, recency): the longest shared prefix wins, then the row freed longest ago.
        At least one prompt token is always prefilled, since its logits give the first output token."""
        same_weights = self._slot_epoch[slot] == self._weights_epoch
        reuse = _common_prefix(self._slot_tokens[slot], prompt) if self.prefix_reuse and same_weights else 0
        return min(reuse, len(prompt) - 1), -self._slot_used[slot]

    def _take_token(self, slot: int, token: int, logprob: float) -> None:
        item = self._slots[slot]
        if item is None:  # aborted while its step ran
            return
        item.output_ids.append(token)
        item.logprobs.append(logprob)
        self.stats["generated_tokens"] += 1
        sp = item.request.sampling
        reason = None
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.config.eos_token_ids):
            reason = "stop"
        elif sp.stop and self._hits_stop_string(item):
            reason = "stop"
        elif len(item.output_ids) >= sp.max_new_tokens:
            reason = "length"
        elif len(item.request.prompt_ids) + len(item.output_ids) >= self.max_context:
            reason = "length"
        elif item.aborted:
            reason = "abort"
        if reason is None:
            self._slot_tokens[slot].append(token)  # fed at the next decode step, so its KV will be cached
        else:
            self._release(slot, reason)

    def _hits_stop_string(self, item: _Live) -> bool:
        longest = max(len(s) for s in item.request.sampling.stop)
        tail = self.detokenize(item.output_ids[-(longest + 4) :])
        return any(s in tail for s in item.request.sampling.stop)

    def _release(self, slot: int, reason: str) -> None:
        item = self._slots[slot]
        self._slots[slot] = None
        # KV is written for the prompt and every output token but the last (never fed back); claim no more.
        del self._slot_tokens[slot][len(item.request.prompt_ids) + len(item.output_ids) - 1 :]
        self._slot_used[slot] = time.perf_counter()
        self._resolve(item, reason)

    def _resolve(self, item: _Live, reason: str) -> None:
        if item.future.done():
            return
        item.future.set_result(
            Completion(
                rid=item.request.rid,
                output_ids=tuple(item.output_ids),
                logprobs=tuple(item.logprobs),
                finish_reason=reason,
                prompt_tokens=len(item.request.prompt_ids),
                completion_tokens=len(item.output_ids),
                weight_version=self.weight_version,
                latency_s=time.perf_counter() - item.submitted,
                cached_tokens=item.cached_tokens,
            )
        )

    # ---- device work (runs in a worker thread; the loop task awaits it, so nothing races) -----------------

    def _sampling_rows(self, items: Sequence[_Live | None]) -> tuple[np.ndarray, ...]:
        def column(get, dtype, idle):
            return np.array([idle if it is None else get(it.request.sampling) for it in items], dtype)

        return (
            np.stack([np.zeros(2, np.uint32) if it is None else it.seed_words for it in items]),
            column(lambda s: s.temperature, np.float32, 0.0),
            column(lambda s: s.top_p, np.float32, 1.0),
            column(lambda s: s.top_k, np.int32, -1),
            column(lambda s: s.min_p, np.float32, 0.0),
        )

    def _run_prefill(self, admitted: list[tuple[int, _Live, int]]) -> list[tuple[int, int, float]]:
        """Prefill the admitted rows in groups of one token bucket -> [(row, first token, its logprob)]."""
        groups: dict[int, list[tuple[int, _Live, int]]] = {}
        for entry in admitted:
            _, item, reuse = entry
            length = _bucket(len(item.request.prompt_ids) - reuse, self.min_prefill_bucket, self.max_context)
            groups.setdefault(length, []).append(entry)
        out = []
        for length, group in sorted(groups.items()):
            rows = _bucket(len(group), 1, self.max_slots)
            padded = group + [group[0]] * (rows - len(group))  # duplicate rows write identical values
            tokens = np.zeros((rows, length), np.int32)
            positions = np.full((rows, length), self._scratch, np.int32)
            last = np.zeros(rows, np.int32)
            for r, (_, item, reuse) in enumerate(padded):
                suffix = item.request.prompt_ids[reuse:]
                tokens[r, : len(suffix)] = suffix
                positions[r, : len(suffix)] = np.arange(reuse, reuse + len(suffix))
                last[r] = len(suffix) - 1
            for _, item, reuse in group:
                self.stats["prefill_tokens"] += len(item.request.prompt_ids) - reuse
                self.stats["reused_tokens"] += reuse
            slots = np.array([slot for slot, _, _ in padded], np.int32)
            with self._mesh_context():
                self._cache, next_tokens, logprobs = _prefill_step(
                    self._step_config, self._compute_dtype, self._params, self._cache, slots, tokens, positions, last,
                    *self._sampling_rows([item for _, item, _ in padded]),
                )  # fmt: skip
            next_tokens, logprobs = np.asarray(next_tokens), np.asarray(logprobs)
            out += [(slot, int(next_tokens[r]), float(logprobs[r])) for r, (slot, _, _) in enumerate(group)]
        return out

    def _run_decode(self) -> tuple[np.ndarray, np.ndarray]:
        """One jitted chunk of decode steps -> (tokens_KB, logprobs_KB), step k's sample of every row."""
        tokens = np.zeros(self.max_slots, np.int32)
        positions = np.full(self.max_slots, self._scratch, np.int32)
        wanted = 1
        for slot, item in enumerate(self._slots):
            if item is not None:
                done = len(item.request.prompt_ids) + len(item.output_ids)
                tokens[slot] = item.output_ids[-1]
                positions[slot] = done - 1
                left = min(
                    item.request.sampling.max_new_tokens - len(item.output_ids), self.max_context - done
                )
                wanted = max(wanted, left)
        # The full chunk, or the power of two that covers what the longest row still needs: few shapes compile.
        steps = _bucket(wanted, 1, self.decode_chunk)
        with self._mesh_context():
            self._cache, next_tokens, logprobs = _decode_chunk(
                self._step_config, self._compute_dtype, steps, self._params, self._cache, tokens, positions,
                *self._sampling_rows(self._slots),
            )  # fmt: skip
        self.stats["decode_steps"] += steps
        self.stats["decode_calls"] += 1
        return np.asarray(next_tokens), np.asarray(logprobs)

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _place_params(self, params: Any) -> Any:
        if self.mesh is None:
            return params
        axes = transformer.param_logical_axes(self.config)
        return jax.device_put(params, mesh_lib.tree_shardings(self.mesh, axes))


# ---- jitted pure functions (module level, so engines with the same config and shapes share compilations) ----


def _logits(config: TransformerConfig, params: Any, hidden_BD: jax.Array) -> jax.Array:
    w_DV = transformer.lm_head_weight(config, params)
    return jnp.einsum("bd,dv->bv", hidden_BD.astype(jnp.float32), w_DV.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _decode_chunk(
    config, compute_dtype, steps, params, cache, tokens_B, positions_B, seed_words_B2, temperature_B, *rows
):
    """`steps` decode steps: feed each row's last token at its position, sample the next position's token, feed
    that one next. Returns (cache, tokens_KB, logprobs_KB); the log-probs come from one fused call over all
    K×B final hidden states. Positions past the context (and idle rows, which start there) use the scratch slot.
    """
    scratch = cache["k"].shape[3] - 1
    positions_KB = positions_B[None, :] + jnp.arange(steps, dtype=positions_B.dtype)[:, None]
    keys_KB = sampling.token_keys(jnp.tile(seed_words_B2, (steps, 1)), positions_KB.reshape(-1) + 1)
    keys_KB = keys_KB.reshape(positions_KB.shape)

    def step(carry, xs):
        cache, tokens_B = carry
        positions_B, keys_B = xs
        hidden_B1D, cache = transformer.hidden_states(
            config, params, tokens_B[:, None], positions_BT=jnp.minimum(positions_B, scratch)[:, None],
            kv_cache=cache, compute_dtype=compute_dtype,
        )  # fmt: skip
        next_B = sampling.sample_next(_logits(config, params, hidden_B1D[:, 0]), keys_B, temperature_B, *rows)
        return (cache, next_B), (hidden_B1D[:, 0], next_B)

    (cache, _), (hidden_KBD, tokens_KB) = jax.lax.scan(step, (cache, tokens_B), (positions_KB, keys_KB))
    logprobs_N = sampling.sampled_logprobs(
        hidden_KBD.reshape(-1, hidden_KBD.shape[-1]), transformer.lm_head_weight(config, params),
        tokens_KB.reshape(-1), jnp.tile(temperature_B, steps),
    )  # fmt: skip
    return cache, tokens_KB, logprobs_N.reshape(tokens_KB.shape)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _prefill_step(
    config,
    compute_dtype,
    params,
    cache,
    slots_P,
    tokens_PT,
    positions_PT,
    last_P,
    seed_words_P2,
    temperature_P,
    *rows,
):
    """Write the prompts' KV into rows `slots_P` of the cache; sample each prompt's first output token."""
    rows_cache = jax.tree.map(lambda c: c[:, slots_P], cache)
    hidden_PTD, rows_cache = transformer.hidden_states(
        config, params, tokens_PT, positions_BT=positions_PT, kv_cache=rows_cache, compute_dtype=compute_dtype
    )
    index_P = jnp.arange(tokens_PT.shape[0])
    hidden_PD = hidden_PTD[index_P, last_P]
    keys_P = sampling.token_keys(seed_words_P2, positions_PT[index_P, last_P] + 1)
    tokens_P = sampling.sample_next(_logits(config, params, hidden_PD), keys_P, temperature_P, *rows)
    w_DV = transformer.lm_head_weight(config, params)
    logprobs_P = sampling.sampled_logprobs(hidden_PD, w_DV, tokens_P, temperature_P)
    cache = jax.tree.map(lambda c, r: c.at[:, slots_P].set(r), cache, rows_cache)
    return cache, tokens_P, logprobs_P
