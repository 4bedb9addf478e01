"""Fused log-prob against an independent float64 reference (torch autograd), on every implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_refs import float64_reference, random_case, rel_err
from orchestra_jax.kernels import fused_logprob, naive_logprob
from orchestra_jax.kernels import logprob_math as lm
from orchestra_jax.kernels import logprob_pallas as pk
from orchestra_jax.kernels import logprob_reference as ref
from orchestra_jax.kernels.bench import peak_bytes
from orchestra_jax.kernels.logprob import _backend

IMPLS = ["reference", "interpret"]


def fused_value_and_grads(impl, h, w, targets, temperature, g_lp, g_ent):
    def loss(h, w):
        logp, entropy = fused_logprob(h, w, targets, temperature=temperature, return_entropy=True, impl=impl)
        return jnp.sum(logp * g_lp) + jnp.sum(entropy * g_ent), (logp, entropy)

    (_, (logp, entropy)), (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
    return logp, entropy, dh, dw


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_matches_float64_forward_and_grads(impl):
    # V = 300 is not a multiple of the 128-wide Pallas tile; T = 37 not of the 64-row one; τ != 1.
    seed = np.random.SeedSequence().entropy % 2**32
    h, w, targets, g_lp, g_ent = random_case(seed, tokens=37, hidden=48, vocab=300)
    got = fused_value_and_grads(impl, h, w, targets, 0.7, g_lp, g_ent)
    want = float64_reference(h, w, targets, 0.7, g_lp, g_ent)
    for name, a, b in zip(("logprob", "entropy", "d_hidden", "d_w"), got, want):
        assert rel_err(a, b) <= 1e-5, (name, seed, rel_err(a, b))
    assert got[0].dtype == jnp.float32 and bool(jnp.all(got[0] <= 0.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_within_1e_2(impl):
    seed = np.random.SeedSequence().entropy % 2**32
    h, w, targets, g_lp, g_ent = random_case(seed, tokens=20, hidden=64, vocab=200, dtype=jnp.bfloat16)
    got = fused_value_and_grads(impl, h, w, targets, 1.0, g_lp, g_ent)
    want = float64_reference(h, w, targets, 1.0, g_lp, g_ent)
    for name, a, b in zip(("logprob", "entropy", "d_hidden", "d_w"), got, want):
        assert rel_err(jnp.asarray(a, jnp.float32), b) <= 1e-2, (name, seed)
    assert got[2].dtype == jnp.bfloat16 and got[3].dtype == jnp.bfloat16


def test_grads_match_autodiff_of_the_naive_reference():
    h, w, targets, g_lp, g_ent = random_case(np.random.SeedSequence().entropy % 2**32, 24, 32, 1000)

    def naive_loss(h, w):
        logp, entropy = naive_logprob(h, w, targets, temperature=1.5, return_entropy=True)
        return jnp.sum(logp * g_lp) + jnp.sum(entropy * g_ent)

    want = jax.grad(naive_loss, argnums=(0, 1))(h, w)
    got = fused_value_and_grads("reference", h, w, targets, 1.5, g_lp, g_ent)[2:]
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_and_extreme_logits(impl):
    # Logits of order ±1e4: the naive exp overflows without max-subtraction; log-probs must stay finite, <= 0.
    h, w, targets, g_lp, g_ent = random_case(np.random.SeedSequence().entropy % 2**32, 1, 16, 130, scale=3e4)
    got = fused_value_and_grads(impl, h, w, targets, 1.0, g_lp, g_ent)
    want = float64_reference(h, w, targets, 1.0, g_lp, g_ent)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in got)
    assert float(got[0][0]) <= 0.0
    np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(np.asarray(got[1]), want[1], atol=1e-3)


def test_logprob_never_positive_when_one_logit_dominates():
    rng = np.random.default_rng(np.random.SeedSequence().entropy % 2**32)
    tokens, vocab = 16, 4000
    w = jnp.asarray(rng.normal(size=(tokens, vocab)) * 1e-3, jnp.float32)
    targets = jnp.asarray(rng.choice(vocab, size=tokens, replace=False), jnp.int32)
    # Token t's hidden state is 10·e_t and only its target column has a large weight on e_t: p(target) -> 1.
    w = w.at[jnp.arange(tokens), targets].set(rng.uniform(5.0, 50.0, size=tokens))
    h = 10.0 * jnp.eye(tokens, dtype=jnp.float32)
    logp, entropy = fused_logprob(h, w, targets, return_entropy=True, impl="reference")
    assert bool(jnp.all(logp <= 0.0)) and bool(jnp.all(entropy >= 0.0))
    assert float(jnp.min(logp)) > -1e-3


def test_pallas_kernels_write_every_element_of_poisoned_outputs():
    # Small tiles so that tokens (3 blocks, padded), hidden (3 slices) and vocab (3 tiles + tail) all loop.
    h, w, targets, g_lp, g_ent = random_case(np.random.SeedSequence().entropy % 2**32, 20, 48, 300)
    tiles = dict(temperature=1.3, block_t=8, block_v=128, block_k=16, interpret=True, poison=True)
    stats = pk.pallas_stats(h, w, targets, **tiles)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in stats)
    logp, entropy, lse, mean_z = lm.finish_stats(stats)
    dh, dw = pk.pallas_grads(h, w, targets, lse, mean_z, g_lp, g_ent, **tiles)
    assert bool(jnp.all(jnp.isfinite(dh))) and bool(jnp.all(jnp.isfinite(dw)))
    want = float64_reference(h, w, targets, 1.3, g_lp, g_ent)
    for a, b in zip((logp, entropy, dh, dw), want):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2), (jnp.float16, 1e-2)])
def test_reference_chunks_that_do_not_divide_the_vocabulary(dtype, tol):
    # chunk 128 over V = 300: the last chunk is shifted left and overlaps; nothing may count twice.
    # (A 16-bit head is sliced as its uint16 bits.)
    h, w, targets, g_lp, g_ent = random_case(np.random.SeedSequence().entropy % 2**32, 10, 16, 300, dtype=dtype)
    logp, entropy, lse, mean_z = lm.finish_stats(
        ref.reference_stats(h, w, targets, temperature=0.9, chunk=128)[0]
    )
    dh, dw = ref.reference_grads(h, w, targets, lse, mean_z, g_lp, g_ent, temperature=0.9, chunk=128)
    want = float64_reference(h, w, targets, 0.9, g_lp, g_ent)
    for a, b in zip((logp, entropy, dh, dw), want):
        assert rel_err(jnp.asarray(a, jnp.float32), b) <= tol


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_kept_logits_give_what_recomputing_them_gives(dtype, tol):
    # 3 chunks of 128 over V = 300, the last one shifted: the backward must pair each kept chunk with its columns.
    seed = np.random.SeedSequence().entropy % 2**32
    h, w, targets, g_lp, g_ent = random_case(seed, 33, 24, 300, dtype=dtype)
    stats, kept = ref.reference_stats(h, w, targets, temperature=0.8, chunk=128, keep_logits=True)
    assert kept.shape == (3, 33, 128)
    logp, entropy, lse, mean_z = lm.finish_stats(stats)
    args = (h, w, targets, lse, mean_z, g_lp, g_ent)
    got = ref.reference_grads(*args, temperature=0.8, chunk=128, logits_NTC=kept)
    recomputed = ref.reference_grads(*args, temperature=0.8, chunk=128)
    want = float64_reference(h, w, targets, 0.8, g_lp, g_ent)[2:]
    for name, a, b, c in zip(("d_hidden", "d_w"), got, recomputed, want):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        assert rel_err(a, b) <= tol / 10 and rel_err(a, c) <= tol, (name, seed)


def test_fused_reference_keeps_logits_only_within_the_budget(monkeypatch):
    h, w, targets, _, _ = random_case(0, 8, 16, 64)
    stats_fn, _ = _backend("reference", 1.0)
    assert stats_fn(h, w, targets)[1].shape == (1, 8, 64)
    monkeypatch.setattr(ref, "KEEP_LOGITS_ELEMENTS", 8 * 64 - 1)
    assert stats_fn(h, w, targets)[1] is None


def test_reference_path_never_materialises_token_by_vocab_logits():
    tokens, hidden, vocab = 2048, 64, 131072  # one [T, V] fp32 array = 1 GiB; only compiled, never run
    shapes = (
        jax.ShapeDtypeStruct((tokens, hidden), jnp.float32),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )

    def program(fn):
        grad = jax.grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1))
        return jax.jit(grad).lower(*shapes).compile()

    naive = program(naive_logprob)
    fused = program(lambda h, w, t: fused_logprob(h, w, t, impl="reference"))
    assert fused.memory_analysis().temp_size_in_bytes < tokens * vocab * 4 / 4
    assert peak_bytes(fused) * 5 < peak_bytes(naive)


def test_works_under_jit_and_rejects_bad_input():
    h, w, targets, _, _ = random_case(0, 4, 8, 50)
    logp = jax.jit(lambda h, w, t: fused_logprob(h, w, t))(h, w, targets)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(naive_logprob(h, w, targets)), rtol=1e-5)
    with pytest.raises(ValueError, match="shapes disagree"):
        fused_logprob(h, w[:4], targets)
    with pytest.raises(ValueError, match="flatten batch dims"):
        fused_logprob(h[None], w, targets)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob(h, w, targets, temperature=0.0)
    with pytest.raises(ValueError, match="impl='bogus'"):
        fused_logprob(h, w, targets, impl="bogus")
    with pytest.raises(ValueError, match="use impl='interpret' on CPU"):
        fused_logprob(h, w, targets, impl="pallas")


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_off_gives_the_same_logprobs_and_gradients(impl):
    # return_entropy=False is a static path (no first moment, no entropy term in ∂z): it must change nothing else.
    h, w, targets, g_lp, _ = random_case(np.random.SeedSequence().entropy % 2**32, 19, 24, 260)

    def loss(h, w, with_entropy):
        out = fused_logprob(h, w, targets, temperature=0.8, return_entropy=with_entropy, impl=impl)
        return jnp.sum((out[0] if with_entropy else out) * g_lp)

    off = jax.value_and_grad(loss, argnums=(0, 1))(h, w, False)
    on = jax.value_and_grad(loss, argnums=(0, 1))(h, w, True)
    want = float64_reference(h, w, targets, 0.8, g_lp, jnp.zeros_like(g_lp))
    assert rel_err(fused_logprob(h, w, targets, temperature=0.8, impl=impl), want[0]) <= 1e-5
    # The loss sums terms of either sign, so it is measured against their size, not against itself (which can
    # cancel to near zero: seed 84 gave a relative error of 1.4e-5 with an absolute one of 2e-8 of that size).
    terms = want[0] * np.asarray(g_lp)
    assert abs(float(off[0]) - float(on[0])) <= 1e-6 * np.sum(np.abs(terms))
    assert abs(float(off[0]) - np.sum(terms)) <= 1e-5 * np.sum(np.abs(terms))
    for a, b, c in zip(off[1], on[1], want[2:]):
        assert rel_err(a, b) <= 1e-6 and rel_err(a, c) <= 1e-5


def test_chunk_plan_keeps_wide_aligned_chunks_on_a_gpu(monkeypatch):
    monkeypatch.setattr(ref.jax, "default_backend", lambda: "gpu")
    assert ref.chunk_plan(16384, 151936) == (8192, 19, False)  # 2^27 logits a chunk, no divisor of V
    assert ref.chunk_plan(65536, 151936) == (2048, 75, False)


def test_chunk_plan_prefers_an_exact_divisor():
    assert ref.chunk_plan(8192, 151936) == (2374, 64, True)  # Qwen3: V / 64
    assert ref.chunk_plan(8192, 150001) == (
        2048,
        74,
        False,
    )  # no divisor near 2048: masked, shifted last chunk
    assert ref.chunk_plan(3, 300) == (300, 1, True)
    assert ref.chunk_plan(3, 300, chunk=128) == (128, 3, False)


@pytest.mark.parametrize("chunk", [100, 128])  # 100 divides V = 300 (exact path, no masks); 128 does not
@pytest.mark.parametrize("with_entropy", [True, False])
def test_reference_exact_and_masked_chunks(chunk, with_entropy):
    h, w, targets, g_lp, g_ent = random_case(np.random.SeedSequence().entropy % 2**32, 10, 16, 300)
    stats, _ = ref.reference_stats(h, w, targets, temperature=0.9, chunk=chunk, with_entropy=with_entropy)
    logp, entropy, lse, mean_z = lm.finish_stats(stats)
    if not with_entropy:
        mean_z, g_ent = None, jnp.zeros_like(g_lp)
    dh, dw = ref.reference_grads(
        h, w, targets, lse, mean_z, g_lp, None if mean_z is None else g_ent, temperature=0.9, chunk=chunk
    )
    want = float64_reference(h, w, targets, 0.9, g_lp, g_ent)
    got = (logp, entropy, dh, dw) if with_entropy else (logp, dh, dw)
    for a, b in zip(got, want if with_entropy else (want[0], *want[2:])):
        assert rel_err(a, b) <= 1e-5


def test_target_logits_ignore_targets_outside_the_shard():
    h, w, targets, _, _ = random_case(np.random.SeedSequence().entropy % 2**32, 6, 8, 40)
    shifted = targets + jnp.asarray([0, 40, -1, 0, 100, 0])  # rows 1, 2, 4 point outside [0, 40)
    tz = lm.target_logits(h, w, shifted, 2.0)
    full = np.asarray(h @ w / 2.0)
    want = [full[i, int(shifted[i])] if 0 <= int(shifted[i]) < 40 else 0.0 for i in range(6)]
    np.testing.assert_allclose(np.asarray(tz), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens,vocab", [(2048, 2048), (24, 300)])
def test_bf16_hidden_with_a_tied_fp32_embedding(tokens, vocab):
    # The train step's LM head: an fp32 embedding [V, H], read transposed and cast to bf16 chunk by chunk, its
    # gradient transposed back. With one vocabulary chunk (tokens = vocab = 2048) XLA's CPU compiler once folded
    # those transposes into a ∂W dot that its runtime cannot run ("BF16 x BF16 = F32").
    h, w, targets, g_lp, _ = random_case(np.random.SeedSequence().entropy % 2**32, tokens, 64, vocab)
    embed_VH = w.T

    def loss(h, embed_VH):
        return jnp.sum(fused_logprob(h, embed_VH.T, targets) * g_lp)

    dh, d_embed = jax.jit(jax.grad(loss, argnums=(0, 1)))(h.astype(jnp.bfloat16), embed_VH)
    want = float64_reference(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, 1.0, g_lp,
                             jnp.zeros_like(g_lp))
    assert dh.dtype == jnp.bfloat16 and d_embed.dtype == jnp.float32
    assert rel_err(jnp.asarray(dh, jnp.float32), want[2]) <= 1e-2 and rel_err(d_embed.T, want[3]) <= 1e-2
