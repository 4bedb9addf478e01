"""The decoder's own invariants (pad writes, remat, dtypes, axes, presets); packing, padding and KV-cache decoding
against transformers are in test_hf_io.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from orchestra_jax.models import transformer as T
from orchestra_jax.models.transformer_config import ConfigFieldError, TransformerConfig, get_preset

FAMILIES = ["qwen3-tiny", "llama-tiny", "qwen2-tiny"]
fwd = jax.jit(T.forward, static_argnums=0, static_argnames=("remat", "compute_dtype", "attention_chunk"))


def _model(name, seed, vocab=97):
    config = get_preset(name, vocab_size=vocab)
    params = T.init_params(config, jax.random.key(seed))
    if config.qkv_bias:  # zero-initialised biases would not exercise the bias path
        for b in ("q_bias", "k_bias", "v_bias"):
            params["layers"][b] = 0.1 * jax.random.normal(jax.random.key(seed + 1), params["layers"][b].shape)
    return config, params


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def test_padded_prefill_skips_pad_cache_writes():
    seed = np.random.randint(1 << 30)
    config, params = _model("qwen2-tiny", seed)
    ids = jax.random.randint(jax.random.key(seed), (2, 6), 0, config.vocab_size)
    segments = jnp.array([[1] * 6, [1, 1, 1, 0, 0, 0]])
    cache = T.init_kv_cache(config, batch=2, max_len=8)
    _, cache = fwd(config, params, ids, segment_ids_BT=segments, kv_cache=cache)
    assert float(jnp.abs(cache["k"][:, 1, :, 3:]).max()) == 0.0
    assert float(jnp.abs(cache["k"][:, 1, :, :3]).min(axis=(1, 3)).max()) > 0.0
    nxt, _ = fwd(config, params, ids[1:, 3:4], kv_cache=jax.tree.map(lambda c: c[:, 1:], cache),
                       positions_BT=jnp.array([[3]]))  # fmt: skip
    assert _rel_err(nxt[0, 0], fwd(config, params, ids[1:, :4])[0, 3]) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_decode_ignores_stale_cache_slots_and_writes_its_own(name):
    """Decode (one token per row) attends to the cache before its position plus its own K/V; slots at and after
    it hold garbage from an earlier request and must not count. Rows sit at different positions."""
    seed = np.random.randint(1 << 30)
    config, params = _model(name, seed)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (3, 9)))
    cache = T.init_kv_cache(config, batch=3, max_len=12)
    cache = jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape), c.dtype), cache)  # stale everywhere
    lengths = np.array([2, 5, 8])
    for t in range(8):  # prefill each row's prefix token by token (positions past its length are dropped writes)
        segments = jnp.asarray((t < lengths)[:, None].astype(np.int32))
        _, cache = fwd(config, params, ids[:, t : t + 1], positions_BT=jnp.full((3, 1), t), segment_ids_BT=segments,
                       kv_cache=cache)
    logits, new_cache = fwd(config, params, ids[np.arange(3), lengths][:, None],
                            positions_BT=jnp.asarray(lengths)[:, None], kv_cache=cache)
    for row, n in enumerate(lengths):
        expect = fwd(config, params, ids[row : row + 1, : n + 1])[0, n]
        assert _rel_err(logits[row, 0], expect) < 1e-5, (row, n)
        np.testing.assert_array_equal(np.asarray(new_cache["k"][:, row, :, n + 1 :]), np.asarray(cache["k"][:, row, :, n + 1 :]))
        assert not np.array_equal(np.asarray(new_cache["k"][:, row, :, n]), np.asarray(cache["k"][:, row, :, n]))


def test_query_chunked_prefill_matches_whole_attention():
    seed = np.random.randint(1 << 30)
    config, params = _model("qwen2-tiny", seed)
    ids = jax.random.randint(jax.random.key(seed), (2, 13), 0, config.vocab_size)
    segments = jnp.array([[1] * 6 + [2] * 7, [1] * 9 + [0] * 4])
    whole = fwd(config, params, ids, segment_ids_BT=segments)
    cache = T.init_kv_cache(config, batch=2, max_len=16)
    chunked, _ = fwd(config, params, ids, attention_chunk=4, kv_cache=cache, segment_ids_BT=segments)
    assert _rel_err(chunked[1, :9], whole[1, :9]) < 1e-5


def _plain_causal_attention(q_BTNH, k_BKTH, v_BKTH, segments_BT):
    """Masked softmax over all keys in float32: the reference for the blocked, custom-VJP attention."""
    b, t, n, h = q_BTNH.shape
    k_BTNH = jnp.repeat(jnp.moveaxis(k_BKTH, 1, 2), n // k_BKTH.shape[1], axis=2).astype(jnp.float32)
    v_BTNH = jnp.repeat(jnp.moveaxis(v_BKTH, 1, 2), n // v_BKTH.shape[1], axis=2).astype(jnp.float32)
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(jnp.float32), k_BTNH) / np.sqrt(h)
    mask_BTS = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
    mask_BTS = mask_BTS & (segments_BT[:, :, None] == segments_BT[:, None, :])
    probs_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], scores_BNTS, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BTNH)


@pytest.mark.parametrize("tiled", [False, True], ids=["blocks", "tiles"])
@pytest.mark.parametrize("dtype, rows, tol", [("float32", 4, 1e-5), ("float32", 13, 1e-5), ("float32", 5, 1e-5),
                                             ("bfloat16", 4, 3e-2), ("bfloat16", 16, 3e-2)])
def test_causal_attention_and_its_gradients_match_plain_attention(tiled, dtype, rows, tol):
    """Query blocks (or square tiles) of 4 and 5 rows skip keys above the diagonal (13 rows: one block; 16: one
    tile, padded); packed segments and a padded tail (segment 0); grouped-query heads (6 query heads over 2 K/V
    heads)."""
    seed = np.random.randint(1 << 30)
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (2, 13, 6, 8)).astype(dtype)
    k = jax.random.normal(kk, (2, 2, 13, 8)).astype(dtype)
    v = jax.random.normal(kv, (2, 2, 13, 8)).astype(dtype)
    g = jax.random.normal(kg, q.shape).astype(dtype)
    segments = jnp.array([[1] * 6 + [2] * 7, [1] * 9 + [0] * 4])
    out, vjp = jax.vjp(lambda q, k, v: T._causal_attention(q, k, v, segments, tiled, rows), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: _plain_causal_attention(q, k, v, segments), q, k, v)
    assert out.dtype == q.dtype
    assert _rel_err(out.astype(jnp.float32), ref) < tol
    for got, want in zip(vjp(g), ref_vjp(g.astype(jnp.float32))):
        assert got.dtype == q.dtype
        assert _rel_err(got.astype(jnp.float32), want) < tol


def test_tiled_attention_matches_the_blocks_without_segments():
    """Rows without segment ids (causality alone), 3 tiles of 5 rows over 13 tokens, in float32."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 4)
    q = jax.random.normal(kq, (2, 13, 6, 8))
    k, v = jax.random.normal(kk, (2, 2, 13, 8)), jax.random.normal(kv, (2, 2, 13, 8))
    g = jax.random.normal(kg, q.shape)
    tiles = jax.vjp(lambda q, k, v: T._causal_attention(q, k, v, None, True, 5), q, k, v)
    blocks = jax.vjp(lambda q, k, v: T._causal_attention(q, k, v, None, False, 4), q, k, v)
    assert _rel_err(tiles[0], blocks[0]) < 1e-5
    for got, want in zip(tiles[1](g), blocks[1](g)):
        assert _rel_err(got, want) < 1e-5


PACKED_ROWS = {  # t = 39: an odd row length
    "packed": [[1] * 15 + [2] * 20 + [3] * 4, [1] * 29 + [0] * 10],  # several segments a row, a padded tail
    "one-per-row": [[1] * 39, [1] * 29 + [0] * 10],  # plain causal attention
    "pads-first": [[0] * 5 + [1] * 34, [1] * 39],  # padding before a segment: no segment offsets
}


@pytest.mark.parametrize("implementation, dtype, tol, max_segments, rows", [
    ("xla", "float32", 1e-5, 16, "packed"),
    ("xla", "bfloat16", 3e-2, 16, "packed"),
    ("xla", "float32", 1e-5, 16, "one-per-row"),
    # segment offsets on Hopper (else the mask); 3 segments and a padded tail > 3: the XLA blocks; 0: the mask
    pytest.param("cudnn", "bfloat16", 3e-2, 16, "packed", marks=pytest.mark.gpu, id="cudnn-packed-bf16"),
    pytest.param("cudnn", "float16", 5e-3, 16, "packed", marks=pytest.mark.gpu, id="cudnn-packed-fp16"),
    pytest.param("cudnn", "bfloat16", 3e-2, 3, "packed", marks=pytest.mark.gpu, id="cudnn-overflow-bf16"),
    pytest.param("cudnn", "bfloat16", 3e-2, 0, "packed", marks=pytest.mark.gpu, id="cudnn-mask-bf16"),
    pytest.param("cudnn", "bfloat16", 3e-2, 16, "one-per-row", marks=pytest.mark.gpu, id="cudnn-rows-bf16"),
    pytest.param("cudnn", "bfloat16", 3e-2, 16, "pads-first", marks=pytest.mark.gpu, id="cudnn-pads-first-bf16"),
])
def test_library_attention_and_its_gradients_match_plain_attention(implementation, dtype, tol, max_segments, rows,
                                                                   monkeypatch):
    """The `jax.nn.dot_product_attention` path (cuDNN on a GPU) masks packed segments and the future like
    `_flash` does, through each call `packed_layout` picks; grouped-query heads (8 query heads over 2 K/V
    heads); an odd row length. A padded tail (segment 0) reaches no real token; what the pads themselves get
    differs between the paths, so they are compared with a zero cotangent only."""
    monkeypatch.setattr(T, "CUDNN_MAX_SEGMENTS", max_segments)
    seed = np.random.randint(1 << 30)
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    t = 39
    q = jax.random.normal(kq, (2, t, 8, 64)).astype(dtype)
    k = jax.random.normal(kk, (2, t, 2, 64)).astype(dtype)
    v = jax.random.normal(kv, (2, t, 2, 64)).astype(dtype)
    segments = jnp.array(PACKED_ROWS[rows])
    real_BT11 = (segments > 0)[:, :, None, None]
    g = jnp.where(real_BT11, jax.random.normal(kg, q.shape), 0).astype(dtype)

    ref, ref_vjp = jax.vjp(
        lambda q, k, v: _plain_causal_attention(q, jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2), segments), q, k, v)
    for layout in (None, T.host_packed_layout(np.asarray(segments))):  # on the device, and static
        attend = jax.jit(lambda q, k, v, layout=layout: T._library_attention(q, k, v, segments, implementation, layout))
        out, vjp = jax.vjp(attend, q, k, v)
        assert out.dtype == q.dtype and np.isfinite(np.asarray(out, np.float32)).all()
        assert _rel_err(jnp.where(real_BT11, out.astype(jnp.float32), 0), jnp.where(real_BT11, ref, 0)) < tol
        for got, want in zip(vjp(g), ref_vjp(g.astype(jnp.float32))):
            assert np.isfinite(np.asarray(got, np.float32)).all()
            assert _rel_err(got.astype(jnp.float32), want) < tol


def test_packed_layout_picks_the_cheapest_exact_call(monkeypatch):
    monkeypatch.setattr(T, "CUDNN_MAX_SEGMENTS", 3)
    layouts = {
        "one segment a row, padded tails": ([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], 0),
        "several segments": ([[1, 1, 2, 2], [1, 1, 1, 0]], 1),
        "three segments and padding: four": ([[1, 2, 3, 0], [1, 1, 1, 1]], 2),
        "three segments, no padding": ([[1, 2, 3, 3], [1, 1, 1, 1]], 1),
        "padding first": ([[0, 1, 1, 1], [1, 1, 1, 1]], 2),
        "padding between segments": ([[1, 0, 2, 2], [1, 1, 1, 1]], 2),
    }
    monkeypatch.setattr(T, "cudnn_packs", lambda: True)
    for name, (segments, want) in layouts.items():
        for xp in (jnp, np):  # on the device and on the host
            assert int(T.packed_layout(xp.array(segments), offsets=True)) == want, name
            assert int(T.packed_layout(xp.array(segments), offsets=False)) == min(want, 1), name
        assert T.host_packed_layout(np.array(segments)[None]) == want, name  # [micro_batches, rows, T]
    # an odd row gets one more (padding) position first: three segments then padding is four
    assert T.host_packed_layout(np.array([[1, 2, 3]])) == 2


def test_segment_layout_gives_each_segments_length_and_start():
    segments = jnp.array([[1, 1, 2, 2, 2, 3, 0, 0], [1] * 8, [0] * 8])
    lengths, starts = T.segment_layout(segments, 4)
    np.testing.assert_array_equal(lengths, [[2, 3, 1, -1], [8, -1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(starts, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1], [-1] * 5])
    lengths, starts = T.segment_layout(T._pads_as_segment(segments), 4)  # the padded tail as one more segment
    np.testing.assert_array_equal(lengths, [[2, 3, 1, 2], [8, -1, -1, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(starts, [[0, 2, 5, 6, -1], [0, -1, -1, -1, -1], [0, -1, -1, -1, -1]])


def test_attention_impl_picks_cudnn_only_on_a_gpu_in_half_precision(monkeypatch):
    want = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert T.attention_impl("auto", jnp.bfloat16) == want
    assert T.attention_impl("auto", jnp.float32) == "xla"
    monkeypatch.setattr(T.jax, "default_backend", lambda: "gpu")
    assert T.attention_impl("auto", jnp.bfloat16, mask_elements=8 * 2048 * 2048) == "cudnn"
    assert T.attention_impl("auto", jnp.bfloat16, mask_elements=8 * 32768 * 32768) == "xla"  # mask too large
    monkeypatch.setattr(T, "cudnn_packs", lambda: True)  # Hopper: segment offsets, no mask
    assert T.attention_impl("auto", jnp.bfloat16, mask_elements=8 * 32768 * 32768) == "cudnn"
    assert T.attention_impl("auto", jnp.float32) == "xla"
    monkeypatch.undo()
    assert T.attention_impl("xla", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
        T.attention_impl("flash", jnp.float32)
    with pytest.raises(ValueError, match="attention 'cudnn' needs a GPU and bf16/fp16 compute"):
        T.attention_impl("cudnn", jnp.float32)


def test_long_rows_take_tiles_that_grow_past_max_tiles():
    base = T.CPU_CAUSAL_BLOCK if jax.default_backend() == "cpu" else T.CAUSAL_BLOCK
    assert T.causal_schedule(100) == T.causal_schedule(T.TILED_FROM - 1) == (False, base)
    assert T.causal_schedule(T.TILED_FROM) == T.causal_schedule(T.TILE_ROWS * T.MAX_TILES) == (True, T.TILE_ROWS)
    assert T.causal_schedule(32768) == (True, 32768 // T.MAX_TILES)


def _loss(config, params, ids, remat):
    return jnp.mean(jax.nn.log_softmax(T.forward(config, params, ids, remat=remat))[..., 0])


grad_fn = jax.jit(jax.grad(_loss, argnums=1), static_argnums=(0, 3))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_gradients(remat):
    config, params = _model("qwen3-tiny", 7)  # fixed inputs: the no-remat reference compiles once
    ids = jax.random.randint(jax.random.key(8), (2, 8), 0, config.vocab_size)
    for a, b in zip(
        jax.tree.leaves(grad_fn(config, params, ids, "none")),
        jax.tree.leaves(grad_fn(config, params, ids, remat)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _hidden_loss(config, params, ids, remat, dtype="bfloat16"):
    """A fixed random projection of the final hidden states (their plain sum of squares is nearly constant
    after the final norm, so its gradients would be all noise)."""
    hidden, _ = T.hidden_states(config, params, ids, compute_dtype=dtype, remat=remat)
    return jnp.sum(hidden.astype(jnp.float32) * jax.random.normal(jax.random.key(0), hidden.shape))


@pytest.mark.parametrize("tiled_from", [T.TILED_FROM, 8], ids=["blocks", "tiles"])
def test_dots_remat_keeps_bf16_activations_as_bits(capsys, monkeypatch, tiled_from):
    """remat "dots" saves each layer's KEPT_ACTIVATIONS, stacked by the layer scan as uint16 bits (a stacked bf16
    residual costs the CPU an f32 round trip per layer), and no bf16 activation stack besides. The XLA attention
    blocks (and tiles) keep their heads-major output and f32 log-sum-exp instead of "attn_out", so the backward
    never reruns their forward."""
    monkeypatch.setattr(T, "TILED_FROM", tiled_from)
    config, params = _model("qwen3-tiny", 3)
    layers, kv, groups = config.num_layers, config.num_kv_heads, config.num_heads // config.num_kv_heads
    ids = jnp.zeros((2, 8), jnp.int32)
    print_saved_residuals(lambda p: _hidden_loss(config, p, ids, "dots"), params)
    from_scan = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line]
    token_major = [t for t in from_scan if t.startswith(f"u16[{layers},2,8,")]
    assert len(token_major) == len(T.KEPT_ACTIVATIONS) - 3  # all but attn_out, attn_heads and attn_lse
    heads, lse = f"u16[{layers},2,{kv},{groups},8,{config.head_dim}]", f"f32[{layers},2,{kv},{groups},8,1]"
    assert sorted(t for t in from_scan if t not in token_major) == sorted(["bf16[2,8,64]", heads, lse])


def test_tiled_attention_under_remat_dots_keeps_the_gradients(monkeypatch):
    """The model's gradient with long-row tiles (TILED_FROM lowered to the row: 3 tiles of 4 tokens) and remat
    "dots" against the query blocks without remat, in float32."""
    config, params = _model("qwen3-tiny", np.random.randint(1 << 30))
    ids = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 12), 0, config.vocab_size)
    ref = jax.tree.leaves(jax.grad(_loss, argnums=1)(config, params, ids, "none"))
    monkeypatch.setattr(T, "TILED_FROM", 12)
    monkeypatch.setattr(T, "TILE_ROWS", 4)
    assert T.causal_schedule(12) == (True, 4)
    for a, b in zip(jax.tree.leaves(jax.grad(_loss, argnums=1)(config, params, ids, "dots")), ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dots_remat_bf16_gradients_are_as_close_to_float32_as_full_remat():
    seed = np.random.randint(1 << 30)
    config, params = _model("qwen3-tiny", seed)
    ids = jax.random.randint(jax.random.key(seed), (2, 8), 0, config.vocab_size)
    grad = jax.jit(jax.grad(_hidden_loss, argnums=1), static_argnums=(0, 3, 4))
    ref = jax.tree.leaves(grad(config, params, ids, "none", "float32"))
    for remat in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grad(config, params, ids, remat)), ref):
            assert _rel_err(a, b) < 0.05, remat


def test_bfloat16_compute_with_float32_params_is_close():
    seed = np.random.randint(1 << 30)
    config, params = _model("qwen3-tiny", seed)
    ids = jax.random.randint(jax.random.key(seed), (2, 8), 0, config.vocab_size)
    ref = fwd(config, params, ids)
    out = fwd(config, params, ids, compute_dtype=jnp.bfloat16)  # float32 params, bfloat16 compute
    assert out.dtype == jnp.float32
    assert _rel_err(out, ref) < 0.05
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    hidden, _ = jax.eval_shape(lambda p: T.hidden_states(config, p, ids), bf16_params)
    assert hidden.dtype == jnp.bfloat16



@pytest.mark.parametrize("spec", ["btd,dnh->btnh", "btnh,nhd->btd", "bkgth,bksh->bkgts"])
def test_bfloat16_einsum_gradients_match_float32(spec):
    """The mixed-precision einsum's hand-written VJP (bf16 operands, f32 accumulation) against autodiff of the
    float32 einsum on the same (bf16-representable) inputs; a float32 y gets a float32 gradient."""
    seed = np.random.randint(1 << 30)
    x_spec, y_spec = spec.split("->")[0].split(",")
    sizes = dict(zip("btdnhkgs", (2, 5, 16, 3, 8, 2, 3, 5)))
    kx, ky, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, [sizes[c] for c in x_spec]).astype(jnp.bfloat16)
    y = jax.random.normal(ky, [sizes[c] for c in y_spec]).astype(jnp.bfloat16).astype(jnp.float32)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, y))
    g = jax.random.normal(kg, out_shape.shape).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, y: T._einsum(spec, x, y), x, y)
    dx, dy = vjp(g)
    ref, ref_vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), x.astype(jnp.float32), y)
    ref_dx, ref_dy = ref_vjp(g.astype(jnp.float32))
    assert out.dtype == dx.dtype == jnp.bfloat16 and dy.dtype == jnp.float32
    assert _rel_err(out.astype(jnp.float32), ref) < 1e-2
    assert _rel_err(dx.astype(jnp.float32), ref_dx) < 1e-2
    assert _rel_err(dy, ref_dy) < 1e-5  # bf16 products are exact in f32; only the sum order differs


@pytest.mark.parametrize("name", ["qwen3-tiny", "llama-tiny"])
def test_rope_inverse_rotation_gradient_matches_autodiff(name):
    """The rotary embedding's hand-written VJP against autodiff of the same formula, at random positions
    (llama-tiny: llama3 frequency scaling)."""
    seed = np.random.randint(1 << 30)
    config = get_preset(name, vocab_size=97)
    kx, kp, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (2, 7, 4, config.head_dim))
    angles = jax.random.randint(kp, (2, 7), 0, 500)[:, :, None] * jnp.asarray(T.rope_inv_freq(config))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    g = jax.random.normal(kg, x.shape)
    plain = T._rope.fun  # the undecorated function: autodiff of the formula itself
    (ref,) = jax.vjp(lambda x: plain(x, cos, sin), x)[1](g)
    (got,) = jax.vjp(lambda x: T._rope(x, cos, sin), x)[1](g)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # HF's rotate_half formula with the angles repeated over both halves
    cos2, sin2 = (jnp.concatenate([a] * 2, -1)[:, :, None] for a in (cos, sin))
    half = config.head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    np.testing.assert_allclose(T._rope(x, cos, sin), x * cos2 + rotated * sin2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_matches_autodiff_of_silu_times_up(dtype):
    """The fused SwiGLU's value and hand-written VJP against autodiff of silu(gate)·up in float64 (numpy
    reference of the formulas), on fresh random inputs; bf16 inputs round once, so within bf16 precision."""
    seed = np.random.randint(1 << 30)
    kg, ku, kd = jax.random.split(jax.random.key(seed), 3)
    gate, up, d = (4.0 * jax.random.normal(k, (3, 5, 24)).astype(dtype) for k in (kg, ku, kd))
    out, vjp = jax.vjp(T._swiglu, gate, up)
    d_gate, d_up = vjp(d)
    g, u, dd = (np.asarray(a, np.float64) for a in (gate, up, d))
    sig = 1.0 / (1.0 + np.exp(-g))
    want = (g * sig * u, dd * u * (sig + g * sig * (1.0 - sig)), dd * g * sig)
    tol = 1e-5 if dtype == "float32" else 1e-2
    for name, got, ref in zip(("out", "d_gate", "d_up"), (out, d_gate, d_up), want):
        assert got.dtype == jnp.dtype(dtype), name
        assert _rel_err(jnp.asarray(got, jnp.float32), jnp.asarray(ref, jnp.float32)) < tol, (name, seed)


@pytest.mark.parametrize("spec,x_shape,y_shape", [
    ("btd,dnh->btnh", (2, 6, 8), (8, 3, 4)),
    ("btnh,nhd->btd", (2, 6, 3, 4), (3, 4, 8)),
    ("btf,fd->btd", (2, 5, 12), (12, 4)),
    ("btd,df->btf", (1, 7, 8), (8, 6)),  # an odd token count: the plain einsum
])
def test_weight_gradient_through_the_pair_transpose_matches_the_einsum(spec, x_shape, y_shape, monkeypatch):
    """bf16 weight gradients with x transposed as 32-bit row pairs (_transposed) equal the plain einsum's."""
    seed = np.random.randint(1 << 30)
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
    y = jax.random.normal(ky, y_shape)
    r = jax.random.normal(jax.random.key(seed + 1), jax.eval_shape(lambda: jnp.einsum(spec, x, y)).shape)
    def grads():  # a new function each time, traced anew, so it reads CPU_PAIR_TRANSPOSE as it then is
        return jax.jit(jax.grad(lambda x, y: jnp.sum(T._einsum(spec, x, y).astype(jnp.float32) * r), (0, 1)))

    paired = grads()(x, y)
    monkeypatch.setattr(T, "CPU_PAIR_TRANSPOSE", False)
    plain = grads()(x, y)
    for a, b in zip(paired, plain):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    rows = x_shape[0] * x_shape[1]
    x_RC = x.reshape(rows, -1)[: rows // 2 * 2]
    np.testing.assert_array_equal(np.asarray(T._transposed(x_RC), np.float32), np.asarray(x_RC, np.float32).T)


@pytest.mark.parametrize("spec,x_shape,y_shape,chunk_rows", [
    ("btd,dnh->btnh", (2, 6, 8), (8, 3, 4), 4),  # 12 rows: three chunks of 4
    ("btf,fd->btd", (3, 8, 12), (12, 4), 10),    # 24 rows: two chunks of 12
    ("btd,df->btf", (2, 5, 8), (8, 6), 4),       # 10 rows: two chunks would be odd, so one
])
def test_weight_gradient_in_token_chunks_matches_float64(spec, x_shape, y_shape, chunk_rows, monkeypatch):
    """The CPU's bf16 weight gradient summed over chunks of CPU_WEIGHT_GRAD_ROWS token rows equals x·g in float64
    (x and g as the bf16 values the matmuls read) to f32 rounding."""
    monkeypatch.setattr(T, "CPU_WEIGHT_GRAD_ROWS", chunk_rows)
    seed = np.random.randint(1 << 30)
    kx, ky, kr = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
    y = jax.random.normal(ky, y_shape)
    r = jax.random.normal(kr, jax.eval_shape(lambda: jnp.einsum(spec, x, y)).shape)
    dy = jax.jit(jax.grad(lambda y: jnp.sum(T._einsum(spec, x, y).astype(jnp.float32) * r)))(y)
    x_spec, y_spec = spec.split("->")[0].split(",")
    out = spec.split("->")[1]
    want = np.einsum(f"{x_spec},{out}->{y_spec}", np.asarray(x, np.float64),
                     np.asarray(r.astype(jnp.bfloat16), np.float64))
    assert _rel_err(dy, want) < 1e-6, seed


@pytest.mark.parametrize("shape", [(2, 7, 24), (2, 7, 3, 8)])  # a layer norm and a per-head q/k norm
def test_rms_norm_gradient_matches_autodiff(shape):
    seed = np.random.randint(1 << 30)
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = 3.0 * jax.random.normal(kx, shape)
    w = jax.random.normal(kw, shape[-1:])
    g = jax.random.normal(kg, shape)
    plain = T._rms_norm.fun  # the undecorated function: autodiff of the formula itself
    ref = jax.vjp(lambda x, w: plain(x, w, 1e-6), x, w)[1](g)
    got = jax.vjp(lambda x, w: T._rms_norm(x, w, 1e-6), x, w)[1](g)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # bf16 activations, f32 weight: the weight's gradient is summed in f32 here, in bf16 by autodiff
    x16, g16 = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    ref16 = jax.vjp(lambda x, w: plain(x.astype(jnp.float32), w, 1e-6), x16.astype(jnp.float32), w)[1](
        g16.astype(jnp.float32))
    got16 = jax.vjp(lambda x, w: T._rms_norm(x, w, 1e-6), x16, w)[1](g16)
    assert got16[0].dtype == jnp.bfloat16 and got16[1].dtype == jnp.float32
    for a, b in zip(got16, ref16):
        assert _rel_err(a.astype(jnp.float32), b) < 2e-2


def test_bfloat16_compute_gradients_are_close():
    seed = np.random.randint(1 << 30)
    config, params = _model("qwen3-tiny", seed)
    ids = jax.random.randint(jax.random.key(seed), (2, 8), 0, config.vocab_size)

    def loss(params, dtype):
        return jnp.mean(jax.nn.log_softmax(T.forward(config, params, ids, compute_dtype=dtype))[..., 0])

    ref = jax.grad(loss)(params, jnp.float32)
    got = jax.grad(loss)(params, jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert a.dtype == jnp.float32
        assert _rel_err(a, b) < 0.1

def test_logical_axes_match_param_shapes():
    for name in FAMILIES + ["qwen3-8b"]:
        config = get_preset(name)
        axes = T.param_logical_axes(config)
        shapes = T.param_shapes(config)
        flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
        assert [len(a) for a in flat_axes] == [len(s) for s in flat_shapes]
        assert sum(int(np.prod(s)) for s in flat_shapes) == config.num_params()


def test_presets_and_config_errors():
    assert 7.5e9 < get_preset("qwen3-8b").num_params() < 8.5e9
    assert 0.55e9 < get_preset("qwen3-0.6b").num_params() < 0.65e9
    assert 130e6 < get_preset("smollm2-135m").num_params() < 140e6
    tiny = get_preset("qwen3-tiny", vocab_size=300)
    assert tiny.vocab_size == 300 and dataclasses.replace(tiny, vocab_size=40).vocab_size == 40
    with pytest.raises(ConfigFieldError, match="nope"):
        get_preset("nope")
    with pytest.raises(ConfigFieldError, match="num_kv_heads"):
        TransformerConfig("llama", 10, 8, 8, 1, num_heads=3, num_kv_heads=2, head_dim=4)


def test_hf_config_round_trip_and_hub_style_fields():
    from orchestra_jax.models.transformer_config import PRESETS, from_hf_config

    for name in PRESETS:
        config = get_preset(name)
        assert from_hf_config(config.to_hf_config()) == config, name
    hub_llama32 = {  # transformers 4.x / Hub layout: rope_theta beside rope_scaling, eos a list
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000,
    }  # fmt: skip
    config = from_hf_config(hub_llama32)
    assert (config.head_dim, config.rope_theta, config.eos_token_ids) == (64, 5e5, (128001, 128008, 128009))
    assert config.rope_scaling_dict["factor"] == 32.0 and 1.2e9 < config.num_params() < 1.3e9
    with pytest.raises(ConfigFieldError, match="x.json: .*'yarn'"):
        from_hf_config(dict(hub_llama32, rope_scaling={"type": "yarn", "factor": 4.0}), source="x.json")
    with pytest.raises(ConfigFieldError, match="x.json: field 'num_hidden_layers'"):
        from_hf_config({k: v for k, v in hub_llama32.items() if k != "num_hidden_layers"}, source="x.json")


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen2-tiny"])
@pytest.mark.parametrize("tied", [True, False])
def test_train_flops_count_every_matmul_weight_once(name, tied):
    """6 FLOPs per weight of each matmul (not the embedding lookup, not norms or biases), plus causal attention;
    the dense count has attention over every key, twice the causal term."""
    config = dataclasses.replace(get_preset(name), tie_word_embeddings=tied)
    layers = T.param_shapes(config)["layers"]
    matmul = sum(int(np.prod(shape)) for key, shape in layers.items() if "norm" not in key and "bias" not in key)
    matmul += config.vocab_size * config.hidden_size  # the LM head: the tied embedding or its own weight
    seq_len = int(np.random.randint(16, 4096))
    attention = 6 * config.num_layers * seq_len * config.num_heads * config.head_dim
    assert config.train_flops_per_token(seq_len) == 6 * matmul + attention
    assert config.train_flops_per_token(seq_len, causal=False) == 6 * matmul + 2 * attention
