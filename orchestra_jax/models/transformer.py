"""The decoder as pure functions over a params pytree (Qwen3, Llama and Qwen2 are switches of one model).

Params are a nested dict of arrays; the per-layer weights are stacked on a leading `layers` axis and run
with `jax.lax.scan`, so compile time does not grow with depth. Weight layouts keep heads as their own axis
(`q`: [L, D, N, H]) so that logical axis names map one-to-one onto dimensions for sharding.

Masking: without a KV cache a query attends to earlier tokens of its own row and segment (segment id 0 is
padding). With a KV cache each new token's K/V is written at cache slot == its position (pads are not
written), and a query at position p attends to slots s <= p of its own row.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from orchestra_jax.models.transformer_config import TransformerConfig
from orchestra_jax.parallel.mesh import with_logical_constraint

Params = dict[str, Any]
REMAT_POLICIES = ("none", "full", "dots")
# What remat "dots" keeps of each layer for the backward: its input, both norm outputs, the q/k/v, gate and up
# projections, the attention output and the residual after it. The backward then recomputes only elementwise work
# and attention, never a projection (the o and down outputs are needed by no gradient). The XLA blocks (`_flash`)
# keep their output in their own heads-major layout with each row's log-sum-exp ("attn_heads", "attn_lse"): that
# is all their backward reads, so it never reruns their forward, and the token-major "attn_out" is then one
# transpose away.
KEPT_ACTIVATIONS = ("layer_in", "attn_in", "q", "k", "v", "attn_out", "attn_heads", "attn_lse", "attn_residual",
                    "mlp_in", "gate", "up")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
CUDNN_MAX_MASK_ELEMENTS = 1 << 28  # "auto" keeps cuDNN's dense [B, 1, T, T] segment mask under 512 MiB of bf16
# cuDNN's packed layout (Hopper and later) takes each row's segments as offsets, compiled for at most this many
# per row; a batch with more takes the XLA blocks. Below 2: packed rows always take the dense mask.
CUDNN_MAX_SEGMENTS = 16
ATTENTION_CHUNK = 1024
CAUSAL_BLOCK = 128
CPU_CAUSAL_BLOCK = 64  # 135M bf16 4 x 128 step 6 % faster, tiny 8 x 256 9 % (session 11); GPUs keep 128
# Rows of TILED_FROM tokens or more run training attention in square tiles, one at a time (`_tiled_flash`):
# TILE_ROWS queries by as many keys, or T / MAX_TILES of each for longer rows. Shorter rows take the unrolled
# blocks (`_flash`), which were as fast or faster there on the CPU (notes/BENCHMARKS.md, session 23).
TILED_FROM = 2048
TILE_ROWS = 256
MAX_TILES = 32
# bf16 weight gradients on the CPU read their activations transposed as 32-bit row pairs (see _weight_grad).
CPU_PAIR_TRANSPOSE = True
# ... and sum rows // CPU_WEIGHT_GRAD_ROWS products over chunks of the token rows (see _weight_grad).
CPU_WEIGHT_GRAD_ROWS = 1024


def _layer_shapes(config: TransformerConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """Per-layer weight name -> (shape without the layers axis, logical axes without `layers`)."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k = config.num_heads, config.num_kv_heads
    shapes = {
        "attn_norm": ((d,), ("embed",)),
        "q": ((d, n, h), ("embed", "heads", "head_dim")),
        "k": ((d, k, h), ("embed", "kv_heads", "head_dim")),
        "v": ((d, k, h), ("embed", "kv_heads", "head_dim")),
        "o": ((n, h, d), ("heads", "head_dim", "embed")),
        "mlp_norm": ((d,), ("embed",)),
        "gate": ((d, f), ("embed", "mlp")),
        "up": ((d, f), ("embed", "mlp")),
        "down": ((f, d), ("mlp", "embed")),
    }
    if config.qkv_bias:
        shapes["q_bias"] = ((n, h), ("heads", "head_dim"))
        shapes["k_bias"] = ((k, h), ("kv_heads", "head_dim"))
        shapes["v_bias"] = ((k, h), ("kv_heads", "head_dim"))
    if config.qk_norm:
        shapes["q_norm"] = ((h,), ("head_dim",))
        shapes["k_norm"] = ((h,), ("head_dim",))
    return shapes


def param_shapes(config: TransformerConfig) -> dict[str, Any]:
    """The params tree with shape tuples at the leaves (what init_params and the checkpoint loaders build)."""
    out: dict[str, Any] = {
        "embed": (config.vocab_size, config.hidden_size),
        "layers": {name: (config.num_layers, *shape) for name, (shape, _) in _layer_shapes(config).items()},
        "final_norm": (config.hidden_size,),
    }
    if not config.tie_word_embeddings:
        out["lm_head"] = (config.hidden_size, config.vocab_size)
    return out


def param_logical_axes(config: TransformerConfig) -> dict[str, Any]:
    """The params tree with a tuple of logical axis names per array (for parallel.mesh.tree_shardings)."""
    out: dict[str, Any] = {
        "embed": ("vocab", "embed"),
        "layers": {name: ("layers", *axes) for name, (_, axes) in _layer_shapes(config).items()},
        "final_norm": ("embed",),
    }
    if not config.tie_word_embeddings:
        out["lm_head"] = ("embed", "vocab")
    return out


def init_params(config: TransformerConfig, key: jax.Array, dtype: Any = "float32") -> Params:
    """Random weights (normal, std 0.02), unit norms, zero biases."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]  # fmt: skip
    keys = jax.random.split(key, len(leaves))
    arrays = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            arrays.append(jnp.ones(shape, dtype))
        elif "bias" in path:
            arrays.append(jnp.zeros(shape, dtype))
        else:
            arrays.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, arrays)


def init_kv_cache(
    config: TransformerConfig, batch: int, max_len: int, dtype: Any = "float32"
) -> dict[str, jax.Array]:
    """K and V as [layers, batch, kv_heads, max_len, head_dim]: heads-major, so a decode step's attention reads
    each layer's cache as plain batched matrices (a sequence-major cache costs a transposing copy per layer)."""
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def kv_cache_logical_axes() -> dict[str, tuple[str, ...]]:
    axes = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
    return {"k": axes, "v": axes}


def lm_head_weight(config: TransformerConfig, params: Params) -> jax.Array:
    """w_DV: the untied head, or the tied embedding transposed."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
    """Rotary inverse frequencies [H/2] in float32, with linear or Llama-3 scaling applied as HF does."""
    h = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h)))).astype(
        np.float32
    )
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def _einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype: Any = None) -> jax.Array:
    """A two-operand einsum in x's dtype with float32 accumulation, cast to `out_dtype` (default x's dtype).

    In bfloat16 it is a custom-VJP op whose gradient matmuls are bf16 x bf16 -> f32 as well: XLA's CPU runs
    those about 2x as fast as f32 ones, while a plain bf16 einsum (bf16 accumulation) runs slower than f32.
    y may stay float32 (a weight); it is cast inside, so its gradient comes back accumulated in f32.
    """
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    if x.dtype == jnp.float32:
        return jnp.einsum(spec, x, y.astype(jnp.float32), preferred_element_type=jnp.float32).astype(out_dtype)
    return _mixed_einsum(spec, out_dtype, x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec, out_dtype, x, y):
    return jnp.einsum(spec, x, y.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_einsum_fwd(spec, out_dtype, x, y):
    return _mixed_einsum(spec, out_dtype, x, y), (x, y)


def _mixed_einsum_bwd(spec, out_dtype, residuals, g):
    """Each operand's gradient is the einsum of the output gradient with the other operand (exact when no
    index is summed within one operand alone, as in every spec here)."""
    x, y = residuals
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{y_spec}->{x_spec}", g, y.astype(x.dtype), preferred_element_type=jnp.float32)
    dy = _weight_grad(x_spec, out, y_spec, x, g)
    return dx.astype(x.dtype), dy.astype(y.dtype)


def _weight_grad(x_spec: str, out: str, y_spec: str, x: jax.Array, g: jax.Array) -> jax.Array:
    """einsum(x, g -> y_spec) in f32, for a weight y whose product x·y shares leading (token) axes with x.

    That matmul contracts both operands over their leading axes. XLA's CPU then writes x transposed, fused
    into whatever produced x: for the MLP's down projection that is the recomputed silu(gate)·up, and the
    fused transposing pass took longer than the matmul. With CPU_PAIR_TRANSPOSE the transpose is made apart,
    on 32-bit pairs of rows (`_transposed`), and the rows are cut into rows // CPU_WEIGHT_GRAD_ROWS chunks whose
    products are summed: YNNPACK ran the 135M step's weight gradients (2048 rows) at 0.16 TFLOP/s on one core,
    and at 0.20 as two 1024-row products (four 512-row ones made the step slower again).
    """
    shared = "".join(c for c in x_spec if c not in y_spec)
    rows = math.prod(x.shape[: len(shared)])
    plain = (not CPU_PAIR_TRANSPOSE or jax.default_backend() != "cpu" or x.dtype.itemsize != 2 or rows % 2
             or not (x_spec.startswith(shared) and out.startswith(shared)
                     and y_spec == x_spec[len(shared):] + out[len(shared):]))
    if plain:
        return jnp.einsum(f"{x_spec},{out}->{y_spec}", x, g, preferred_element_type=jnp.float32)
    x_RI, g_RO = x.reshape(rows, -1), g.reshape(rows, -1)
    n = max(1, rows // CPU_WEIGHT_GRAD_ROWS)
    n = n if rows % (2 * n) == 0 else 1
    c = rows // n
    dy_IO = functools.reduce(operator.add, (
        jnp.dot(_transposed(x_RI[i * c:(i + 1) * c]), g_RO[i * c:(i + 1) * c], preferred_element_type=jnp.float32)
        for i in range(n)))
    return dy_IO.reshape(x.shape[len(shared):] + g.shape[len(shared):])


def _transposed(x_RC: jax.Array) -> jax.Array:
    """x [R, C] (16-bit, R even) transposed as a [R/2, C] array of 32-bit row pairs: XLA's CPU ran that about
    twice as fast as a 16-bit transpose fused into x's producer. The barriers keep the two apart, and keep XLA
    from folding the transpose back into the matmul that reads it (which then runs in f32)."""
    r, c = x_RC.shape
    pairs = jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(x_RC).reshape(r // 2, 2, c).transpose(0, 2, 1),
                                         jnp.uint32)
    return jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(pairs.T, x_RC.dtype).reshape(c, r))


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


@jax.custom_vjp
def _rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """HF's rotate-half convention: dims i and i + R of head_dim (R = head_dim / 2) form pair i, rotated by the
    angle whose cos/sin are [..., i].

    A rotation's gradient is the inverse rotation (sin negated), which the custom VJP applies as one
    elementwise pass: autodiff's version is a chain of slices, pads and, in bf16, rounding converts that XLA's
    CPU runs several times slower. cos/sin come from positions and get no gradient.
    """
    half = x_BTNH.shape[-1] // 2
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def _rope_fwd(x_BTNH, cos_BTR, sin_BTR):
    return _rope(x_BTNH, cos_BTR, sin_BTR), (cos_BTR, sin_BTR)


def _rope_bwd(residuals, g_BTNH):
    cos_BTR, sin_BTR = residuals
    return _rope(g_BTNH, cos_BTR, -sin_BTR), None, None


_rope.defvjp(_rope_fwd, _rope_bwd)


@jax.custom_vjp
def _swiglu(gate_BTF: jax.Array, up_BTF: jax.Array) -> jax.Array:
    """silu(gate)·up in float32, rounded once to the inputs' dtype.

    In bf16, autodiff's version rounds after every op of silu and of its derivative, and XLA's CPU ran those
    chains as separate passes full of converts; the custom VJP is one f32 pass each way (and closer to f32).
    """
    g = gate_BTF.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up_BTF.astype(jnp.float32)).astype(gate_BTF.dtype)


def _swiglu_fwd(gate_BTF, up_BTF):
    return _swiglu(gate_BTF, up_BTF), (gate_BTF, up_BTF)


def _swiglu_bwd(residuals, d_BTF):
    gate_BTF, up_BTF = residuals
    g, u, d = gate_BTF.astype(jnp.float32), up_BTF.astype(jnp.float32), d_BTF.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_up = d * g * sig
    d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
    return d_gate.astype(gate_BTF.dtype), d_up.astype(up_BTF.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, cast back, then scale (HF's order, which matters in bf16).

    The custom VJP is the textbook one in a single f32 pass, with the weight's gradient summed by a matmul:
    autodiff's version summed it in the compute dtype (bf16) through a reduce-window that XLA's CPU runs
    slowly, and took 1.2-3x as long for the whole backward (a /tmp probe at the tiny and 135M shapes).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * _inv_rms(x32, eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def _inv_rms(x32: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def _rms_norm_fwd(x, weight, eps):
    return _rms_norm(x, weight, eps), (x, weight)


def _rms_norm_bwd(eps, residuals, g):
    """∂x = r·(∂n − n·mean(∂n·n)) with n = x·r, r = 1/rms(x), ∂n = g·w; ∂w = Σ g·n over every leading dim."""
    x, weight = residuals
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    inv_rms = _inv_rms(x32, eps)
    normed32 = x32 * inv_rms
    d_normed = g32 * weight.astype(x.dtype).astype(jnp.float32)
    dx = inv_rms * (d_normed - normed32 * jnp.mean(d_normed * normed32, axis=-1, keepdims=True))
    g_normed_ND = (g32 * normed32.astype(x.dtype).astype(jnp.float32)).reshape(-1, x.shape[-1])
    dw = jnp.dot(jnp.ones((1, g_normed_ND.shape[0]), jnp.float32), g_normed_ND)[0]
    return dx.astype(x.dtype), dw.astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _attention_block(
    q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array
) -> jax.Array:
    """Heads-major layout ([B, K, G, T, H] queries, [B, K, S, H] keys/values) so both einsums are plain batched
    matmuls (token-major einsums lower with transposes inside on the CPU)."""
    q_BKGTH = _heads_major(q_BTNH, k_BKSH.shape[1])
    k_BKSH = k_BKSH.astype(q_BTNH.dtype)
    v_BKSH = v_BKSH.astype(q_BTNH.dtype)
    scale = np.float32(1.0 / math.sqrt(q_BTNH.shape[-1]))
    scores_BKGTS = _einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH, jnp.float32) * scale
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(q_BTNH.dtype)
    return _token_major(_einsum("bkgts,bksh->bkgth", probs_BKGTS, v_BKSH))


def _heads_major(q_BTNH: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, H] queries -> [B, K, G, T, H]: each K/V head's G query heads next to each other."""
    b, t, n, h = q_BTNH.shape
    return jnp.moveaxis(q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h), 1, 3)


def _token_major(out_BKGTH: jax.Array) -> jax.Array:
    """The inverse of `_heads_major`."""
    b, k, g, t, h = out_BKGTH.shape
    return jnp.moveaxis(out_BKGTH, 3, 1).reshape(b, t, k * g, h)


def _attention(q_BTNH, k_BKSH, v_BKSH, positions_BT, chunk: int | None) -> jax.Array:
    """Prefill attention over cache slots <= each query's position; above `chunk` queries it runs query block by
    query block (each rematerialised), so the [T, S] scores never exist at once."""
    keys_S = jnp.arange(k_BKSH.shape[2])

    def block(q_BTNH, positions_BT):
        return _attention_block(q_BTNH, k_BKSH, v_BKSH, keys_S[None, None, :] <= positions_BT[:, :, None])

    b, t = q_BTNH.shape[:2]
    if chunk is None or t <= chunk:
        return block(q_BTNH, positions_BT)
    pad = (-t) % chunk
    n = (t + pad) // chunk

    def blocks(x):  # [B, T, ...] -> [n, B, chunk, ...]; padded query rows are computed and dropped
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    out_nBCNH = jax.lax.map(jax.checkpoint(lambda xs: block(*xs)), (blocks(q_BTNH), blocks(positions_BT)))
    return jnp.moveaxis(out_nBCNH, 0, 1).reshape(b, n * chunk, *q_BTNH.shape[2:])[:, :t]


def causal_schedule(t: int) -> tuple[bool, int]:
    """(tiled, rows) of training attention over rows of t tokens: square tiles of `rows` for long rows, else
    unrolled query blocks of `rows` (64 on the CPU, 128 elsewhere). At 32768 tokens a tile is 1024 rows."""
    if t >= TILED_FROM:
        return True, max(TILE_ROWS, -(-t // MAX_TILES))
    return False, CPU_CAUSAL_BLOCK if jax.default_backend() == "cpu" else CAUSAL_BLOCK


def _causal_attention(q_BTNH, k_BKTH, v_BKTH, segments_BT, tiled: bool, rows: int) -> jax.Array:
    """Attention to earlier tokens of the same row and segment (segment id 0 is padding), for training."""
    q_BKGTH = _heads_major(q_BTNH, k_BKTH.shape[1])
    k_BKTH, v_BKTH = k_BKTH.astype(q_BTNH.dtype), v_BKTH.astype(q_BTNH.dtype)
    flash = _tiled_flash if tiled else _flash
    return _token_major(flash(q_BKGTH, k_BKTH, v_BKTH, segments_BT, rows))


def attention_impl(impl: str, dtype: Any, mask_elements: int = 0) -> str:
    """Training attention: "cudnn" (cuDNN's fused flash attention; GPU, bf16/fp16 only) or "xla" (`_flash`).
    "auto" picks cuDNN where it runs, unless it would need a dense segment mask (no packed layout: before
    Hopper) of more than CUDNN_MAX_MASK_ELEMENTS (`mask_elements` = B·T² for packed rows): long packed rows then
    take the XLA blocks, which never build a [T, T] array."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention {impl!r} is not one of {ATTENTION_IMPLS}")
    fused_ok = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        small_mask = mask_elements <= CUDNN_MAX_MASK_ELEMENTS
        return "cudnn" if fused_ok and (small_mask or cudnn_packs()) else "xla"
    if impl == "cudnn" and not fused_ok:
        raise ValueError(f"attention 'cudnn' needs a GPU and bf16/fp16 compute (here: {jax.default_backend()}, "
                         f"{jnp.dtype(dtype).name})")
    return impl


def cudnn_packs() -> bool:
    """Whether cuDNN takes packed rows as segment offsets here (compute capability 9.0 and later)."""
    if CUDNN_MAX_SEGMENTS < 2 or jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return tuple(int(x) for x in str(capability).split(".")) >= (9, 0)


def _library_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT, implementation: str,
                       layout: int | None = None) -> jax.Array:
    """Causal attention within each segment through `jax.nn.dot_product_attention` ("cudnn" on a GPU; "xla"
    is the same call's plain path, which tests compare with `_flash` on the CPU). Packed rows take the cheapest
    call that is exact for the batch: `layout` (`packed_layout`, found ahead on the host), else a switch on the
    device. cuDNN's masked training kernels need an even T, so an odd row gets one more position, which no
    earlier query can see."""
    t = q_BTNH.shape[1]
    k_BTKH, v_BTKH = k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype)
    if t % 2:
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, [(0, 0), (0, 1), (0, 0), (0, 0)]) for x in (q_BTNH, k_BTKH, v_BTKH))
        if segments_BT is not None:
            segments_BT = jnp.pad(segments_BT, [(0, 0), (0, 1)])
    rows = functools.partial(_unsegmented_attention, implementation=implementation)
    if segments_BT is None:
        return rows(q_BTNH, k_BTKH, v_BTKH, None)[:, :t]
    offsets = implementation == "cudnn" and cudnn_packs()
    branches = ([rows, _cudnn_packed_attention, _blocks_attention] if offsets
                else [rows, functools.partial(_masked_attention, implementation=implementation)])
    if layout is None:
        out_BTNH = jax.lax.switch(packed_layout(segments_BT, offsets), branches, q_BTNH, k_BTKH, v_BTKH,
                                  segments_BT)
    else:  # a layout found for the offsets' three calls maps 2 onto the dense mask here, exact for any batch
        out_BTNH = branches[min(layout, len(branches) - 1)](q_BTNH, k_BTKH, v_BTKH, segments_BT)
    return out_BTNH[:, :t]


def packed_layout(segments_BT: Any, offsets: bool) -> Any:
    """Which attention call a packed batch takes: 0 when every row is one segment then padding (plain causal
    attention is exact for its real tokens, and the pads' outputs reach nothing); 1 for several segments a row
    (cuDNN's segment offsets where it takes them, else a dense same-segment mask); with offsets, 2 where they
    do not fit (more than CUDNN_MAX_SEGMENTS a row counting the padding, or padding before a segment): the XLA
    blocks. Each call is exact for the batches of the ones before it. numpy in, numpy out (on the host)."""
    xp = np if isinstance(segments_BT, np.ndarray) else jnp
    one_per_row = xp.all(segments_BT <= 1) & xp.all(segments_BT[:, 1:] <= segments_BT[:, :-1])
    if not offsets:
        return xp.where(one_per_row, 0, 1)
    pads_trail = xp.all((segments_BT[:, :-1] != 0) | (segments_BT[:, 1:] == 0))
    used_B = xp.max(segments_BT, axis=1) + xp.any(segments_BT == 0, axis=1)
    return xp.where(one_per_row, 0, xp.where(pads_trail & (xp.max(used_B) <= CUDNN_MAX_SEGMENTS), 1, 2))


def host_packed_layout(segment_ids: Any) -> int:
    """`packed_layout` of a whole batch ([..., T] segment ids, on the host) for cuDNN's calls here: the layout
    a jitted step can take as a static setting, so that it has no conditional around the attention (XLA lays
    out each branch of one apart, with transposes at its boundary, and autodiff fills the residuals of the
    branches not taken with zeros)."""
    segments = np.asarray(segment_ids)
    segments = segments.reshape(-1, segments.shape[-1])
    if segments.shape[1] % 2:  # as _library_attention pads an odd row
        segments = np.pad(segments, [(0, 0), (0, 1)])
    return int(packed_layout(segments, offsets=cudnn_packs()))


def _unsegmented_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT, implementation: str) -> jax.Array:
    """Plain causal attention over whole rows (no mask, grouped K/V heads as they are): for rows of one segment
    and a padded tail, so `segments_BT` is unused."""
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=implementation)


def _masked_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT, implementation: str) -> jax.Array:
    """Packed rows as a [B, 1, T, T] same-segment mask, which cuDNN adds as a bias (and, in the backward,
    computes that bias's unused gradient): before Hopper, and the "xla" path."""
    mask_B1TT = (segments_BT[:, :, None] == segments_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TT, is_causal=True,
                                        implementation=implementation)


def segment_layout(segments_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """(lengths [B, M], starts [B, M + 1]) of each row's segments 1..M, -1 where a row has fewer: cuDNN's
    packed layout. Segments are contiguous and numbered from 1 in order (rl.batching.pack); 0 is padding."""
    ids_M = jnp.arange(1, max_segments + 1, dtype=segments_BT.dtype)
    lengths_BM = jnp.sum(segments_BT[:, :, None] == ids_M, axis=1, dtype=jnp.int32)
    starts_BM = jnp.cumsum(lengths_BM, axis=1, dtype=jnp.int32) - lengths_BM
    present_BM = lengths_BM > 0
    starts_BM = jnp.where(present_BM, starts_BM, -1)
    return jnp.where(present_BM, lengths_BM, -1), jnp.pad(starts_BM, [(0, 0), (0, 1)], constant_values=-1)


def _pads_as_segment(segments_BT: jax.Array) -> jax.Array:
    """Segment ids with each row's padded tail as one more segment, so cuDNN's packed layout covers every
    position: the pads then get ordinary attention among themselves instead of whatever cuDNN leaves in rows
    outside all segments, and need no zeroing (`packed_layout` sends a batch here only when its pads trail)."""
    return jnp.where(segments_BT > 0, segments_BT, jnp.max(segments_BT, axis=1, keepdims=True) + 1)


def _cudnn_packed_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT) -> jax.Array:
    """cuDNN flash attention over the packed layout. K/V heads are repeated to the query heads: jax's wrapper
    scales both offset tensors by the query's heads x head_dim, which is K/V's token stride only without
    grouped queries."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    groups = q_BTNH.shape[2] // k_BTKH.shape[2]
    k_BTNH, v_BTNH = jnp.repeat(k_BTKH, groups, axis=2), jnp.repeat(v_BTKH, groups, axis=2)
    lengths_BM, starts_BM = segment_layout(_pads_as_segment(segments_BT), CUDNN_MAX_SEGMENTS)
    return cudnn_attention(q_BTNH, k_BTNH, v_BTNH, q_seqlen=lengths_BM, kv_seqlen=lengths_BM,
                           q_offsets=starts_BM, kv_offsets=starts_BM, scale=1.0 / math.sqrt(q_BTNH.shape[-1]),
                           mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _blocks_attention(q_BTNH, k_BTKH, v_BTKH, segments_BT) -> jax.Array:
    """The XLA blocks, for a batch with more segments per row than cuDNN's packed layout was compiled for."""
    k_BKTH, v_BKTH = jnp.moveaxis(k_BTKH, 1, 2), jnp.moveaxis(v_BTKH, 1, 2)
    return _causal_attention(q_BTNH, k_BKTH, v_BKTH, segments_BT, *causal_schedule(q_BTNH.shape[1]))


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _masked_scores(q_BKGCH, k_BKSH, queries_C, keys_S, segments_BC, segments_BS) -> tuple[jax.Array, jax.Array]:
    """Scaled f32 scores of queries at positions `queries_C` against keys at `keys_S`, and their mask
    [B, 1, 1, C, S]: causal, within a segment (None: rows of one segment)."""
    scale = np.float32(1.0 / math.sqrt(q_BKGCH.shape[-1]))
    scores_BKGCS = jnp.einsum("bkgch,bksh->bkgcs", q_BKGCH, k_BKSH, preferred_element_type=jnp.float32) * scale
    mask_BCS = (keys_S[None, :] <= queries_C[:, None])[None]
    if segments_BC is not None:
        mask_BCS = mask_BCS & (segments_BC[:, :, None] == segments_BS[:, None, :])
    return scores_BKGCS, mask_BCS[:, None, None]


def _block_scores(q_BKGTH, k_BKTH, segments_BT, start: int, end: int) -> tuple[jax.Array, jax.Array]:
    """`_masked_scores` of queries [start, end) against keys [0, end) (the later keys are all masked)."""
    segments = (None, None) if segments_BT is None else (segments_BT[:, start:end], segments_BT[:, :end])
    return _masked_scores(q_BKGTH[:, :, :, start:end], k_BKTH[:, :, :end], jnp.arange(start, end), jnp.arange(end),
                          *segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BKGTH, k_BKTH, v_BKTH, segments_BT, block):
    """Causal attention query block by query block, skipping the keys above each block (a flash-attention
    schedule in plain XLA: at T = 1024 it halved a layer's attention time on the CPU in a /tmp probe). The
    backward keeps only the output and the per-row log-sum-exp and recomputes each block's probabilities, so no
    [T, T] array is saved between the passes."""
    return _flash_fwd(q_BKGTH, k_BKTH, v_BKTH, segments_BT, block)[0]


def _flash_fwd(q_BKGTH, k_BKTH, v_BKTH, segments_BT, block):
    outs, lses = [], []
    for start, end in _query_blocks(q_BKGTH.shape[3], block):
        scores_BKGCS, mask = _block_scores(q_BKGTH, k_BKTH, segments_BT, start, end)
        scores_BKGCS = jnp.where(mask, scores_BKGCS, -jnp.inf)
        top_BKGC1 = jnp.max(scores_BKGCS, axis=-1, keepdims=True)  # finite: a query always sees itself
        probs_BKGCS = jnp.exp(scores_BKGCS - top_BKGC1)
        total_BKGC1 = jnp.sum(probs_BKGCS, axis=-1, keepdims=True)
        out_BKGCH = jnp.einsum("bkgcs,bksh->bkgch", probs_BKGCS.astype(v_BKTH.dtype), v_BKTH[:, :, :end],
                               preferred_element_type=jnp.float32)
        outs.append((out_BKGCH / total_BKGC1).astype(q_BKGTH.dtype))
        lses.append(top_BKGC1 + jnp.log(total_BKGC1))
    out_BKGTH, lse_BKGT1 = jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)
    out_BKGTH, lse_BKGT1 = _kept_bits(out_BKGTH, "attn_heads"), checkpoint_name(lse_BKGT1, "attn_lse")
    return out_BKGTH, (q_BKGTH, k_BKTH, v_BKTH, segments_BT, out_BKGTH, lse_BKGT1)


def _flash_bwd(block, residuals, g_BKGTH):
    """dP = g·Vᵀ, dS = P ∘ (dP − rowsum(g ∘ O)), dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·g (scale folded into dS)."""
    q_BKGTH, k_BKTH, v_BKTH, segments_BT, out_BKGTH, lse_BKGT1 = residuals
    dtype = q_BKGTH.dtype
    scale = np.float32(1.0 / math.sqrt(q_BKGTH.shape[-1]))
    g32_BKGTH = g_BKGTH.astype(jnp.float32)
    delta_BKGT1 = jnp.sum(g32_BKGTH * out_BKGTH.astype(jnp.float32), axis=-1, keepdims=True)
    dq_blocks = []
    # dK and dV are summed transposed, [B, K, H, T]: each block's matmul then reads Q and g transposed (a
    # [G·C, H] block) instead of dS and P (a [G·C, end] block, up to T / C times larger), and XLA's CPU wrote
    # those transposed copies slowly, fused into their producers.
    dkt_BKHT = jnp.zeros(k_BKTH.shape[:2] + k_BKTH.shape[:1:-1], jnp.float32)
    dvt_BKHT = jnp.zeros(v_BKTH.shape[:2] + v_BKTH.shape[:1:-1], jnp.float32)
    for start, end in _query_blocks(q_BKGTH.shape[3], block):
        scores_BKGCS, mask = _block_scores(q_BKGTH, k_BKTH, segments_BT, start, end)
        probs_BKGCS = jnp.where(mask, jnp.exp(scores_BKGCS - lse_BKGT1[:, :, :, start:end]), 0.0)
        g_BKGCH = g_BKGTH[:, :, :, start:end]
        dvt_BKHT = dvt_BKHT.at[:, :, :, :end].add(jnp.einsum(
            "bkgch,bkgcs->bkhs", g_BKGCH, probs_BKGCS.astype(dtype), preferred_element_type=jnp.float32))
        dprobs_BKGCS = jnp.einsum("bkgch,bksh->bkgcs", g_BKGCH, v_BKTH[:, :, :end],
                                  preferred_element_type=jnp.float32)
        dscores_BKGCS = (probs_BKGCS * (dprobs_BKGCS - delta_BKGT1[:, :, :, start:end]) * scale).astype(dtype)
        dq_blocks.append(jnp.einsum("bkgcs,bksh->bkgch", dscores_BKGCS, k_BKTH[:, :, :end],
                                    preferred_element_type=jnp.float32).astype(dtype))
        dkt_BKHT = dkt_BKHT.at[:, :, :, :end].add(jnp.einsum(
            "bkgch,bkgcs->bkhs", q_BKGTH[:, :, :, start:end], dscores_BKGCS, preferred_element_type=jnp.float32))
    # The barrier keeps XLA from folding the swap into a lone block's matmul (one block: T <= the block rows),
    # which its CPU then could not run in bf16 ("Unsupported element type for DotThunk").
    dkt_BKHT, dvt_BKHT = jax.lax.optimization_barrier((dkt_BKHT, dvt_BKHT))
    dk_BKTH, dv_BKTH = (jnp.swapaxes(d, 2, 3).astype(dtype) for d in (dkt_BKHT, dvt_BKHT))
    return jnp.concatenate(dq_blocks, axis=3), dk_BKTH, dv_BKTH, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tile(x: jax.Array, axis: int, i: Any, rows: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=axis)


def _padded(x: jax.Array, axis: int, length: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _tile_scores(q_BKGCH, k_BKCH, segments_BT, i, j, rows: int) -> tuple[jax.Array, jax.Array]:
    """`_masked_scores` of query tile i against key tile j (a padded tail's keys lie after every real query, so
    causality hides them)."""
    segments = (None, None) if segments_BT is None else (_tile(segments_BT, 1, i, rows), _tile(segments_BT, 1, j, rows))
    offsets_C = jnp.arange(rows)
    return _masked_scores(q_BKGCH, k_BKCH, i * rows + offsets_C, j * rows + offsets_C, *segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_flash(q_BKGTH, k_BKTH, v_BKTH, segments_BT, rows):
    """`_flash` over square tiles of `rows` queries by `rows` keys in loops, with the online softmax of flash
    attention: only the tiles on and below the diagonal run, one at a time, so the step holds one tile's scores
    where the unrolled blocks let XLA's CPU keep many blocks' [C, T] scores live (7.2 GiB against 0.15 GiB for
    two 8192-token rows of SmolLM2-135M's attention, and 2.2x as fast: notes/BENCHMARKS.md, session 23)."""
    return _tiled_flash_fwd(q_BKGTH, k_BKTH, v_BKTH, segments_BT, rows)[0]


def _tiled_flash_fwd(q_BKGTH, k_BKTH, v_BKTH, segments_BT, rows):
    t = q_BKGTH.shape[3]
    n = -(-t // rows)
    q, k, v = _padded(q_BKGTH, 3, n * rows), _padded(k_BKTH, 2, n * rows), _padded(v_BKTH, 2, n * rows)
    segments = None if segments_BT is None else _padded(segments_BT, 1, n * rows)
    lowest = np.float32(jnp.finfo(jnp.float32).min)  # not -inf: a tile can mask a whole row

    def query_tile(i, outputs):
        q_BKGCH = _tile(q, 3, i, rows)

        def key_tile(j, state):
            top_BKGC1, total_BKGC1, acc_BKGCH = state
            scores_BKGCS, mask = _tile_scores(q_BKGCH, _tile(k, 2, j, rows), segments, i, j, rows)
            scores_BKGCS = jnp.where(mask, scores_BKGCS, lowest)
            new_top_BKGC1 = jnp.maximum(top_BKGC1, jnp.max(scores_BKGCS, axis=-1, keepdims=True))
            probs_BKGCS = jnp.where(mask, jnp.exp(scores_BKGCS - new_top_BKGC1), 0.0)
            decay_BKGC1 = jnp.exp(top_BKGC1 - new_top_BKGC1)
            total_BKGC1 = total_BKGC1 * decay_BKGC1 + jnp.sum(probs_BKGCS, axis=-1, keepdims=True)
            acc_BKGCH = acc_BKGCH * decay_BKGC1 + jnp.einsum(
                "bkgcs,bksh->bkgch", probs_BKGCS.astype(v.dtype), _tile(v, 2, j, rows),
                preferred_element_type=jnp.float32)
            return new_top_BKGC1, total_BKGC1, acc_BKGCH

        row_shape = q_BKGCH.shape[:-1] + (1,)
        start = (jnp.full(row_shape, lowest), jnp.zeros(row_shape, jnp.float32), jnp.zeros(q_BKGCH.shape, jnp.float32))
        top_BKGC1, total_BKGC1, acc_BKGCH = jax.lax.fori_loop(0, i + 1, key_tile, start)
        out_BKGTH, lse_BKGT1 = outputs
        out_BKGTH = jax.lax.dynamic_update_slice_in_dim(
            out_BKGTH, (acc_BKGCH / total_BKGC1).astype(q.dtype), i * rows, axis=3)
        lse_BKGT1 = jax.lax.dynamic_update_slice_in_dim(
            lse_BKGT1, top_BKGC1 + jnp.log(total_BKGC1), i * rows, axis=3)
        return out_BKGTH, lse_BKGT1

    outputs = (jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape[:-1] + (1,), jnp.float32))
    out_BKGTH, lse_BKGT1 = jax.lax.fori_loop(0, n, query_tile, outputs)
    out_BKGTH = _kept_bits(out_BKGTH[:, :, :, :t], "attn_heads")
    lse_BKGT1 = checkpoint_name(lse_BKGT1[:, :, :, :t], "attn_lse")
    return out_BKGTH, (q_BKGTH, k_BKTH, v_BKTH, segments_BT, out_BKGTH, lse_BKGT1)


def _tiled_flash_bwd(rows, residuals, g_BKGTH):
    """`_flash_bwd`'s sums, key tile by key tile: dK and dV of a key tile gather over the query tiles at and
    below it, and dQ accumulates in place."""
    q_BKGTH, k_BKTH, v_BKTH, segments_BT, out_BKGTH, lse_BKGT1 = residuals
    dtype = q_BKGTH.dtype
    t = q_BKGTH.shape[3]
    n = -(-t // rows)
    scale = np.float32(1.0 / math.sqrt(q_BKGTH.shape[-1]))
    delta_BKGT1 = jnp.sum(g_BKGTH.astype(jnp.float32) * out_BKGTH.astype(jnp.float32), axis=-1, keepdims=True)
    q, g = _padded(q_BKGTH, 3, n * rows), _padded(g_BKGTH, 3, n * rows)
    lse, delta = _padded(lse_BKGT1, 3, n * rows), _padded(delta_BKGT1, 3, n * rows)
    k, v = _padded(k_BKTH, 2, n * rows), _padded(v_BKTH, 2, n * rows)
    segments = None if segments_BT is None else _padded(segments_BT, 1, n * rows)

    def key_tile(j, grads):
        k_BKCH, v_BKCH = _tile(k, 2, j, rows), _tile(v, 2, j, rows)

        def query_tile(i, state):
            dq_BKGTH, dkt_BKHC, dvt_BKHC = state
            q_BKGCH, g_BKGCH = _tile(q, 3, i, rows), _tile(g, 3, i, rows)
            scores_BKGCS, mask = _tile_scores(q_BKGCH, k_BKCH, segments, i, j, rows)
            probs_BKGCS = jnp.where(mask, jnp.exp(scores_BKGCS - _tile(lse, 3, i, rows)), 0.0)
            # dK and dV are summed transposed, as in `_flash_bwd`, so their matmuls read Q and g transposed.
            dvt_BKHC = dvt_BKHC + jnp.einsum("bkgch,bkgcs->bkhs", g_BKGCH, probs_BKGCS.astype(dtype),
                                             preferred_element_type=jnp.float32)
            dprobs_BKGCS = jnp.einsum("bkgch,bksh->bkgcs", g_BKGCH, v_BKCH, preferred_element_type=jnp.float32)
            dscores_BKGCS = (probs_BKGCS * (dprobs_BKGCS - _tile(delta, 3, i, rows)) * scale).astype(dtype)
            dq_BKGCH = _tile(dq_BKGTH, 3, i, rows) + jnp.einsum(
                "bkgcs,bksh->bkgch", dscores_BKGCS, k_BKCH, preferred_element_type=jnp.float32)
            dq_BKGTH = jax.lax.dynamic_update_slice_in_dim(dq_BKGTH, dq_BKGCH, i * rows, axis=3)
            dkt_BKHC = dkt_BKHC + jnp.einsum("bkgch,bkgcs->bkhs", q_BKGCH, dscores_BKGCS,
                                             preferred_element_type=jnp.float32)
            return dq_BKGTH, dkt_BKHC, dvt_BKHC

        dq_BKGTH, dkt_BKHT, dvt_BKHT = grads
        zeros_BKHC = jnp.zeros(k_BKCH.shape[:2] + (k_BKCH.shape[3], rows), jnp.float32)
        dq_BKGTH, dkt_BKHC, dvt_BKHC = jax.lax.fori_loop(j, n, query_tile, (dq_BKGTH, zeros_BKHC, zeros_BKHC))
        dkt_BKHT = jax.lax.dynamic_update_slice_in_dim(dkt_BKHT, dkt_BKHC, j * rows, axis=3)
        dvt_BKHT = jax.lax.dynamic_update_slice_in_dim(dvt_BKHT, dvt_BKHC, j * rows, axis=3)
        return dq_BKGTH, dkt_BKHT, dvt_BKHT

    transposed = k.shape[:2] + (k.shape[3], n * rows)
    grads = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(transposed, jnp.float32), jnp.zeros(transposed, jnp.float32))
    dq_BKGTH, dkt_BKHT, dvt_BKHT = jax.lax.fori_loop(0, n, key_tile, grads)
    dkt_BKHT, dvt_BKHT = jax.lax.optimization_barrier((dkt_BKHT, dvt_BKHT))  # see `_flash_bwd`
    dk_BKTH, dv_BKTH = (jnp.swapaxes(d, 2, 3)[:, :, :t].astype(dtype) for d in (dkt_BKHT, dvt_BKHT))
    return dq_BKGTH[:, :, :, :t].astype(dtype), dk_BKTH, dv_BKTH, None


_tiled_flash.defvjp(_tiled_flash_fwd, _tiled_flash_bwd)


def _decode_attention(q_B1NH, k_cache_BKSH, v_cache_BKSH, k_B1KH, v_B1KH, positions_B1) -> jax.Array:
    """One new token per row: attend to cache slots before its position and to its own K/V, without writing
    them into the cache first (so a decode step reads the cache but never copies it; the caller writes
    every layer's new K/V in one scatter)."""
    b, _, n, h = q_B1NH.shape
    kv = k_cache_BKSH.shape[1]
    q_BKGH = q_B1NH.reshape(b, kv, n // kv, h)
    scale = np.float32(1.0 / math.sqrt(h))
    cached_BKGS = _einsum("bkgh,bksh->bkgs", q_BKGH, k_cache_BKSH, jnp.float32) * scale
    before_BS = jnp.arange(k_cache_BKSH.shape[2])[None, :] < positions_B1
    cached_BKGS = jnp.where(before_BS[:, None, None], cached_BKGS, jnp.finfo(jnp.float32).min)
    own_BKG = jnp.einsum("bkgh,bkh->bkg", q_BKGH, k_B1KH[:, 0], preferred_element_type=jnp.float32) * scale
    top_BKG = jnp.maximum(jnp.max(cached_BKGS, axis=-1), own_BKG)
    cached_BKGS = jnp.exp(cached_BKGS - top_BKG[..., None])
    own_BKG = jnp.exp(own_BKG - top_BKG)
    denom_BKG = jnp.sum(cached_BKGS, axis=-1) + own_BKG
    out_BKGH = _einsum("bkgs,bksh->bkgh", cached_BKGS.astype(q_B1NH.dtype), v_cache_BKSH)
    out_BKGH = out_BKGH + own_BKG[..., None].astype(q_B1NH.dtype) * v_B1KH[:, 0, :, None].astype(q_B1NH.dtype)
    out_BKGH = out_BKGH / denom_BKG[..., None].astype(q_B1NH.dtype)
    return out_BKGH.reshape(b, 1, n, h)


def _kept_bits(x: jax.Array, name: str) -> jax.Array:
    """Name an activation for remat "dots" to keep (its policy saves these names). A 16-bit one is kept as its
    uint16 bits: XLA's CPU compiler upcasts a stacked bf16 residual to f32 and back at every layer (kernels'
    `_rows` works around the same conversion), and stacks the bits as they are."""
    if x.dtype.itemsize != 2:
        return checkpoint_name(x, name)
    bits = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint16), name)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


# An integer bitcast has no derivative: the custom JVP passes the tangent through.
_keep = jax.custom_jvp(_kept_bits, nondiff_argnums=(1,))


@_keep.defjvp
def _keep_jvp(name, primals, tangents):
    # The primal goes through _kept_bits itself, not _keep: a nested custom_jvp call would hide the name from
    # the remat policy.
    return _kept_bits(primals[0], name), tangents[0]


def _no_keep(x: jax.Array, name: str) -> jax.Array:
    return x


def _layer(config: TransformerConfig, x_BTD, p, cos_BTR, sin_BTR, attend, cache_kv, keep=_no_keep):
    """One decoder block; returns the new residual stream and what `attend` returns for the cache (the layer's
    updated K/V cache, its new K/V only, or None). `keep` names the activations remat "dots" saves."""
    dtype = x_BTD.dtype
    eps = config.rms_norm_eps
    x_BTD = keep(x_BTD, "layer_in")
    h_BTD = keep(_rms_norm(x_BTD, p["attn_norm"], eps), "attn_in")
    q_BTNH = keep(_einsum("btd,dnh->btnh", h_BTD, p["q"]), "q")
    k_BTKH = keep(_einsum("btd,dkh->btkh", h_BTD, p["k"]), "k")
    v_BTKH = keep(_einsum("btd,dkh->btkh", h_BTD, p["v"]), "v")
    if config.qkv_bias:
        q_BTNH = q_BTNH + p["q_bias"].astype(dtype)
        k_BTKH = k_BTKH + p["k_bias"].astype(dtype)
        v_BTKH = v_BTKH + p["v_bias"].astype(dtype)
    if config.qk_norm:
        q_BTNH = _rms_norm(q_BTNH, p["q_norm"], eps)
        k_BTKH = _rms_norm(k_BTKH, p["k_norm"], eps)
    q_BTNH = with_logical_constraint(_rope(q_BTNH, cos_BTR, sin_BTR), ("batch", "seq", "heads", "head_dim"))
    k_BTKH = _rope(k_BTKH, cos_BTR, sin_BTR)
    attn_BTNH, new_cache = attend(q_BTNH, k_BTKH, v_BTKH, cache_kv)
    x_BTD = keep(x_BTD + _einsum("btnh,nhd->btd", attn_BTNH, p["o"]), "attn_residual")
    x_BTD = with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
    h_BTD = keep(_rms_norm(x_BTD, p["mlp_norm"], eps), "mlp_in")
    gate_BTF = keep(_einsum("btd,df->btf", h_BTD, p["gate"]), "gate")
    up_BTF = keep(_einsum("btd,df->btf", h_BTD, p["up"]), "up")
    act_BTF = with_logical_constraint(_swiglu(gate_BTF, up_BTF), ("batch", "seq", "mlp"))
    x_BTD = x_BTD + _einsum("btf,fd->btd", act_BTF, p["down"])
    return with_logical_constraint(x_BTD, ("batch", "seq", "embed")), new_cache


def hidden_states(
    config: TransformerConfig,
    params: Params,
    token_ids_BT: jax.Array,
    *,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    kv_cache: dict[str, jax.Array] | None = None,
    compute_dtype: Any = None,
    remat: str = "none",
    attention_chunk: int | None = ATTENTION_CHUNK,
    attention: str = "auto",
    layout: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Final-normed hidden states [B, T, D] (so the log-prob kernel can fuse the LM head) and the new cache.

    `attention_chunk`: with a KV cache (prefill), above this many tokens attention runs in query blocks of this
    size (None: never). `attention` (without a cache): see `attention_impl`; "xla" runs query blocks or, for long
    rows, tiles (`causal_schedule(T)`). `layout`: cuDNN's call for these packed rows (`host_packed_layout`; None: found
    on the device). `remat`: "full" keeps only each layer's input for the backward and recomputes the
    layer; "dots" keeps KEPT_ACTIVATIONS and recomputes only elementwise work and attention.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {REMAT_POLICIES}")
    token_ids_BT = jnp.asarray(token_ids_BT)
    b, t = token_ids_BT.shape
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else params["embed"].dtype
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    positions_BT = jnp.asarray(positions_BT, jnp.int32)
    x_BTD = with_logical_constraint(
        jnp.take(params["embed"], token_ids_BT, axis=0).astype(dtype), ("batch", "seq", "embed")
    )
    angles_BTR = positions_BT[:, :, None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
    cos_BTR, sin_BTR = jnp.cos(angles_BTR), jnp.sin(angles_BTR)
    segment_ids_BT = None if segment_ids_BT is None else jnp.asarray(segment_ids_BT)
    write_BT = positions_BT
    if kv_cache is not None and segment_ids_BT is not None:
        write_BT = jnp.where(segment_ids_BT == 0, kv_cache["k"].shape[3], positions_BT)  # pads: dropped write

    decode = kv_cache is not None and t == 1 and segment_ids_BT is None
    training_attention = attention_impl(attention, dtype, 0 if segment_ids_BT is None else b * t * t)

    keep = _keep if remat == "dots" else _no_keep

    def attend(q_BTNH, k_BTKH, v_BTKH, cache_kv):
        """The attention output and what `_layer` returns for the cache. For remat "dots" cuDNN's output is kept
        as "attn_out"; the XLA blocks keep their own residuals (see KEPT_ACTIVATIONS)."""
        if cache_kv is None and training_attention == "cudnn":
            attn_BTNH = _library_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, "cudnn", layout)
            return keep(attn_BTNH, "attn_out"), None
        if cache_kv is None:
            return _blocks_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT), None
        k_cache_BKSH, v_cache_BKSH = cache_kv
        if decode:
            attn_BTNH = _decode_attention(q_BTNH, k_cache_BKSH, v_cache_BKSH, k_BTKH, v_BTKH, positions_BT)
            return attn_BTNH, (k_BTKH.astype(k_cache_BKSH.dtype), v_BTKH.astype(v_cache_BKSH.dtype))
        # Row and slot indices around a slice: the indexed block is [B, T, K, H], the new K/V's own shape.
        rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], write_BT.shape)
        k_cache_BKSH = k_cache_BKSH.at[rows_BT, :, write_BT].set(k_BTKH.astype(k_cache_BKSH.dtype), mode="drop")
        v_cache_BKSH = v_cache_BKSH.at[rows_BT, :, write_BT].set(v_BTKH.astype(v_cache_BKSH.dtype), mode="drop")
        attn_BTNH = _attention(q_BTNH, k_cache_BKSH, v_cache_BKSH, positions_BT, attention_chunk)
        return attn_BTNH, (k_cache_BKSH, v_cache_BKSH)

    def body(x_BTD, xs):
        layer_params, cache_kv = xs
        return _layer(config, x_BTD, layer_params, cos_BTR, sin_BTR, attend, cache_kv, keep)

    if remat == "full":
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    elif remat == "dots":
        policy = jax.checkpoint_policies.save_only_these_names(*KEPT_ACTIVATIONS)
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    cache_xs = None if kv_cache is None else (kv_cache["k"], kv_cache["v"])
    x_BTD, new_cache = jax.lax.scan(body, x_BTD, (params["layers"], cache_xs))
    x_BTD = _rms_norm(x_BTD, params["final_norm"], config.rms_norm_eps)
    if new_cache is None:
        return x_BTD, None
    if decode:  # new_cache holds each layer's new K/V [L, B, 1, K, H]: one in-place scatter for all layers
        rows_B = jnp.arange(b)  # indices around slices: the indexed block is [B, L, K, H]
        return x_BTD, {name: kv_cache[name].at[:, rows_B, :, write_BT[:, 0]].set(jnp.moveaxis(new[:, :, 0], 0, 1),
                                                                                   mode="drop")
                       for name, new in zip(("k", "v"), new_cache)}
    return x_BTD, {"k": new_cache[0], "v": new_cache[1]}


def forward(config: TransformerConfig, params: Params, token_ids_BT: jax.Array, **kwargs: Any):
    """float32 logits [B, T, V]; with `kv_cache=` given, (logits_BTV, updated kv_cache)."""
    hidden_BTD, new_cache = hidden_states(config, params, token_ids_BT, **kwargs)
    w_DV = lm_head_weight(config, params)
    logits_BTV = jnp.einsum(
        "btd,dv->btv", hidden_BTD, w_DV.astype(hidden_BTD.dtype), preferred_element_type=jnp.float32
    )
    logits_BTV = with_logical_constraint(logits_BTV, ("batch", "seq", "vocab"))
    return logits_BTV if kwargs.get("kv_cache") is None else (logits_BTV, new_cache)
