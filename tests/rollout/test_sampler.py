"""The embedded sampler against the model itself: log-probs, batching invariance, stops, prefix reuse, weights."""

import asyncio
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchestra_jax.models import transformer
from orchestra_jax.rollout.engine import GenerateRequest, RequestError, RolloutEngine, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine

SLOTS, CONTEXT = 4, 128  # the shapes of conftest's servers, so compilations are shared across test files


@pytest.fixture(scope="module")
def model(tiny_model):
    return (
        tiny_model  # qwen3-tiny over the small tokenizer's vocabulary, embeddings scaled for decisive logits
    )


def _engine(model, **kw):
    config, params = model
    return EmbeddedEngine(config, params, max_slots=SLOTS, max_context=CONTEXT, **kw)


def _prompts(n, rng, vocab=300):
    return [tuple(int(t) for t in rng.integers(8, vocab, size=rng.integers(3, 20))) for _ in range(n)]


def _teacher_forced_logprobs(config, params, prompt, output, temperature):
    ids = jnp.asarray([list(prompt) + list(output)], jnp.int32)
    hidden_1TD, _ = transformer.hidden_states(config, params, ids)
    hidden_TD = hidden_1TD[0, len(prompt) - 1 : -1]
    targets_T = jnp.asarray(output, jnp.int32)
    w_DV = transformer.lm_head_weight(config, params)
    try:
        from orchestra_jax.kernels import fused_logprob
    except ImportError:
        logits = (hidden_TD @ w_DV).astype(jnp.float32) / temperature
        return jax.nn.log_softmax(logits)[jnp.arange(len(output)), targets_T]
    return fused_logprob(hidden_TD, w_DV, targets_T, temperature=temperature)


def test_logprobs_equal_teacher_forced(model):
    config, params = model
    rng = np.random.default_rng()
    prompts = _prompts(3, rng)

    async def run():
        engine = _engine(model)
        assert isinstance(engine, RolloutEngine)
        requests = [
            GenerateRequest(
                p,
                SamplingParams(max_new_tokens=12, temperature=t, top_p=0.9, seed=i, ignore_eos=True),
                f"r{i}",
            )
            for i, (p, t) in enumerate(zip(prompts, [1.0, 0.6, 1.0]))
        ]
        return requests, await engine.generate(requests)

    requests, completions = asyncio.run(run())
    for request, completion in zip(requests, completions):
        assert completion.rid == request.rid and completion.completion_tokens == 12
        expected = _teacher_forced_logprobs(
            config, params, request.prompt_ids, completion.output_ids, request.sampling.temperature
        )
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4)
        assert all(lp <= 1e-6 for lp in completion.logprobs)


def test_continuous_batching_equals_each_request_alone(model):
    rng = np.random.default_rng()
    prompts = _prompts(7, rng)
    seeds = rng.integers(0, 2**62, size=7)
    kinds = [
        dict(temperature=1.0),
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=5),
        dict(temperature=1.2, top_p=0.7),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=0.5),
        dict(temperature=1.0, top_k=3, top_p=0.9),
    ]
    requests = [
        GenerateRequest(p, SamplingParams(max_new_tokens=int(rng.integers(4, 16)), seed=int(s), **k), f"r{i}")
        for i, (p, s, k) in enumerate(zip(prompts, seeds, kinds))
    ]

    async def together():  # 7 requests over 4 slots: later ones join as earlier ones finish
        return await _engine(model).generate(requests)

    async def alone():
        engine = _engine(model, prefix_reuse=False)
        return [(await engine.generate([r]))[0] for r in requests]

    batched, single = asyncio.run(together()), asyncio.run(alone())
    for b, s in zip(batched, single):
        assert b.output_ids == s.output_ids
        np.testing.assert_allclose(b.logprobs, s.logprobs, atol=1e-5)


def test_stops_and_lengths(model):
    rng = np.random.default_rng()
    prompt = _prompts(1, rng)[0]

    async def run():
        engine = _engine(model, detokenize=lambda ids: " ".join(f"t{i}" for i in ids))
        [free] = await engine.generate(
            [GenerateRequest(prompt, SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True), "a")]
        )
        stop_token = free.output_ids[4]
        stop_at = free.output_ids.index(stop_token)
        sp = SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True)
        by_token, by_string, context = await engine.generate(
            [
                GenerateRequest(prompt, dataclasses.replace(sp, stop_token_ids=(stop_token,)), "b"),
                GenerateRequest(prompt, dataclasses.replace(sp, stop=(f"t{stop_token}",)), "c"),
                GenerateRequest(prompt, dataclasses.replace(sp, max_new_tokens=200), "e"),
            ]
        )
        config, params = model
        with_eos = EmbeddedEngine(
            dataclasses.replace(config, eos_token_ids=(stop_token,)),
            params,
            max_slots=SLOTS,
            max_context=CONTEXT,
        )
        eos, ignored = await with_eos.generate(
            [
                GenerateRequest(prompt, dataclasses.replace(sp, ignore_eos=False), "d"),
                GenerateRequest(prompt, sp, "f"),
            ]
        )
        return free, stop_at, by_token, by_string, eos, ignored, context

    free, stop_at, by_token, by_string, eos, ignored, context = asyncio.run(run())
    assert free.finish_reason == "length" and len(free.output_ids) == 10
    for stopped in (by_token, by_string, eos):  # stop token id, stop string, the model's eos
        assert stopped.finish_reason == "stop"
        assert stopped.output_ids == free.output_ids[: stop_at + 1]
    assert ignored.output_ids == free.output_ids and ignored.finish_reason == "length"
    assert context.finish_reason == "length" and context.prompt_tokens + context.completion_tokens == CONTEXT


def test_prefix_reuse_skips_prefill_and_keeps_tokens(model):
    rng = np.random.default_rng()
    first = _prompts(1, rng)[0]

    async def run(reuse):
        engine = _engine(model, prefix_reuse=reuse)
        sp = SamplingParams(max_new_tokens=6, seed=5, ignore_eos=True)
        [turn1] = await engine.generate([GenerateRequest(first, sp, "t1")])
        follow_up = first + turn1.output_ids + (11, 12, 13)
        [turn2] = await engine.generate([GenerateRequest(follow_up, sp, "t2")])
        return turn2, engine.stats

    reused, stats = asyncio.run(run(True))
    fresh, fresh_stats = asyncio.run(run(False))
    assert reused.output_ids == fresh.output_ids
    np.testing.assert_allclose(reused.logprobs, fresh.logprobs, atol=1e-5)
    assert reused.cached_tokens == len(first) + 5 and fresh.cached_tokens == 0
    assert stats["prefill_tokens"] == fresh_stats["prefill_tokens"] - reused.cached_tokens


def test_update_weights_changes_outputs_and_version(model):
    config, params = model
    rng = np.random.default_rng()
    prompt = _prompts(1, rng)[0]
    other = transformer.init_params(config, jax.random.key(int(rng.integers(2**31))))
    other = dict(other, embed=other["embed"] * 2)  # less peaked than the served model: log-probs differ

    async def run():
        engine = _engine(model, weight_version="v0")
        request = GenerateRequest(
            prompt, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True), "g"
        )
        [before] = await engine.generate([request])
        await engine.update_weights(other, "v1")
        [after] = await engine.generate([request])
        with pytest.raises(ValueError, match="shape"):
            await engine.update_weights(dict(other, embed=other["embed"][:10]), "bad")
        return before, after, engine.weight_version

    before, after, version = asyncio.run(run())
    assert (before.weight_version, after.weight_version, version) == ("v0", "v1", "v1")
    assert after.cached_tokens == 0  # the prompt's KV from the old weights is not reused
    assert not np.allclose(before.logprobs, after.logprobs, atol=1e-3)
    expected = _teacher_forced_logprobs(config, other, prompt, after.output_ids, 1.0)
    np.testing.assert_allclose(after.logprobs, expected, atol=1e-4)


def test_bad_requests_raise_and_engine_keeps_serving(model):
    rng = np.random.default_rng()
    prompt = _prompts(1, rng)[0]

    async def run():
        engine = _engine(model)
        for bad, word in [
            (GenerateRequest((), SamplingParams(), "empty"), "empty"),
            (GenerateRequest(tuple(range(8, 8 + CONTEXT)), SamplingParams(), "long"), "context"),
            (GenerateRequest((1, 999), SamplingParams(), "vocab"), "prompt_ids\\[1\\]"),
            (GenerateRequest(prompt, SamplingParams(top_p=2.0), "topp"), "top_p"),
            (GenerateRequest(prompt, SamplingParams(stop=("x",)), "stop"), "detokenizer"),
        ]:
            with pytest.raises(RequestError, match=word):
                await engine.generate([bad])
        return await engine.generate([GenerateRequest(prompt, SamplingParams(max_new_tokens=3), "ok")])

    [ok] = asyncio.run(run())
    assert ok.completion_tokens >= 1


def test_abort_finishes_running_request(model):
    rng = np.random.default_rng()
    prompt = _prompts(1, rng)[0]

    async def run():
        # One step a call, and a poll at every turn of the event loop: with 16-step chunks and a 10 ms poll, a fast
        # machine had finished all 40 tokens before the abort came (abort() returned 0).
        engine = _engine(model, decode_chunk=1)
        task = asyncio.ensure_future(
            engine.generate(
                [GenerateRequest(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True), "long")]
            )
        )
        while engine.stats["decode_steps"] < 2:
            await asyncio.sleep(0)
        assert engine.abort("long") == 1
        return await task

    [done] = asyncio.run(run())
    assert done.finish_reason == "abort" and 1 <= done.completion_tokens < 40


def test_cancelled_caller_frees_its_slot(model):
    rng = np.random.default_rng()
    prompt = _prompts(1, rng)[0]

    async def run():
        engine = _engine(model)
        long = SamplingParams(max_new_tokens=100, ignore_eos=True)
        task = asyncio.ensure_future(engine.generate([GenerateRequest(prompt, long, "gone")]))
        while engine.stats["decode_steps"] < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.num_running == 0
        return await engine.generate([GenerateRequest(prompt, SamplingParams(max_new_tokens=2), "next")])

    [done] = asyncio.run(run())
    assert done.completion_tokens >= 1


def _angle_detokenize(ids):
    return "".join(f"<{i}>" for i in ids)  # no token's text is a substring of another's


def test_decode_chunk_does_not_change_tokens(model):
    """Chunks of 8 and single steps agree on tokens, log-probs and finish reasons, with stops landing mid-chunk."""
    rng = np.random.default_rng()
    prompts = _prompts(5, rng)
    seeds = [int(s) for s in rng.integers(0, 2**62, size=5)]

    def engine(chunk):
        return _engine(model, decode_chunk=chunk, detokenize=_angle_detokenize)

    async def free_run():
        sp = SamplingParams(max_new_tokens=20, temperature=0.9, seed=seeds[0], ignore_eos=True)
        return (await engine(1).generate([GenerateRequest(prompts[0], sp, "free")]))[0]

    free = asyncio.run(free_run())
    stop_token, stop_text = free.output_ids[5], f"<{free.output_ids[11]}>"
    base = dict(max_new_tokens=30, ignore_eos=True)
    settings = [
        dict(base, temperature=0.9, stop_token_ids=(stop_token,)),  # stops at index <= 5
        dict(base, temperature=0.9, stop=(stop_text,)),  # stops at index <= 11
        dict(base, temperature=1.0, top_p=0.8, max_new_tokens=13),  # length, mid-chunk
        dict(base, temperature=0.7, top_k=20),  # runs the longest
        dict(base, temperature=0.0, max_new_tokens=10),
    ]
    prompts[1], seeds[1] = prompts[0], seeds[0]  # both stop requests replay the free run
    requests = [
        GenerateRequest(p, SamplingParams(seed=s, **kw), f"r{i}")
        for i, (p, s, kw) in enumerate(zip(prompts, seeds, settings))
    ]

    async def run(chunk):
        e = engine(chunk)
        return await e.generate(requests), e.stats

    (single, single_stats), (chunked, chunked_stats) = asyncio.run(run(1)), asyncio.run(run(8))
    for s, c in zip(single, chunked):
        assert (s.output_ids, s.finish_reason) == (c.output_ids, c.finish_reason)
        np.testing.assert_allclose(s.logprobs, c.logprobs, atol=1e-5)
    by_token, by_string, short = chunked[0], chunked[1], chunked[2]
    for stopped, token in [(by_token, stop_token), (by_string, free.output_ids[11])]:
        assert stopped.finish_reason == "stop"
        assert stopped.output_ids == free.output_ids[: free.output_ids.index(token) + 1]
    assert short.finish_reason == "length" and short.completion_tokens == 13
    assert chunked_stats["decode_calls"] * 4 <= single_stats["decode_calls"]


def test_context_limit_mid_chunk_keeps_other_rows_and_cached_prefix(model):
    """A request whose context ends mid-chunk finishes with 'length'; the steps it runs past its end write only
    after its last fed token or into the scratch slot, so batch mates and the KV it leaves for reuse are intact."""
    config, params = model
    rng = np.random.default_rng()
    limited = tuple(int(t) for t in rng.integers(8, 300, size=CONTEXT - 12))
    others = _prompts(2, rng)
    sp = SamplingParams(max_new_tokens=40, temperature=1.0, seed=int(rng.integers(2**62)), ignore_eos=True)
    requests = [GenerateRequest(p, sp, f"r{i}") for i, p in enumerate([limited, *others])]

    async def run():
        engine = _engine(model, decode_chunk=8)
        done = await engine.generate(requests)
        [row] = [s for s in range(SLOTS) if engine._slot_tokens[s][: len(limited)] == list(limited)]
        kept = list(engine._slot_tokens[row])
        cache = jax.tree.map(lambda c: np.asarray(c[:, row]), engine._cache)
        follow = limited + done[0].output_ids[:-1]
        [again] = await engine.generate([GenerateRequest(follow, sp, "again")])
        return done, kept, cache, follow, again

    done, kept, cache, follow, again = asyncio.run(run())

    async def reference():  # single steps, each request alone, no prefix reuse
        engine = _engine(model, decode_chunk=1, prefix_reuse=False)
        singles = [(await engine.generate([r]))[0] for r in requests[1:]]
        return singles, (await engine.generate([GenerateRequest(follow, sp, "fresh")]))[0]

    singles, fresh = asyncio.run(reference())
    assert done[0].finish_reason == "length" and done[0].completion_tokens == 12
    assert kept == list(follow)  # the prompt and every output token but the last
    for together, single in zip(done[1:], singles):
        assert together.output_ids == single.output_ids
        np.testing.assert_allclose(together.logprobs, single.logprobs, atol=1e-5)
    # The KV the row keeps equals a fresh prefill of the same tokens.
    _, prefilled = transformer.hidden_states(
        config, params, jnp.asarray([follow], jnp.int32),
        kv_cache=transformer.init_kv_cache(config, 1, CONTEXT + 1),
    )  # fmt: skip
    for name in ("k", "v"):
        np.testing.assert_allclose(
            cache[name][:, :, : len(follow)], prefilled[name][:, 0, :, : len(follow)], atol=1e-4
        )
    assert again.cached_tokens == len(follow) - 1 and again.finish_reason == "length"
    assert again.output_ids == fresh.output_ids
    np.testing.assert_allclose(again.logprobs, fresh.logprobs, atol=1e-5)


def test_decode_chunk_must_be_positive(model):
    with pytest.raises(ValueError, match="decode_chunk"):
        _engine(model, decode_chunk=0)
