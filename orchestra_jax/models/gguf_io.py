"""Read llama.cpp GGUF files (llama, qwen2, qwen3 architectures) as dequantised params.

llama.cpp's converter permutes the rows of Llama-family q and k weights (it pairs rotary dimensions
interleaved, HF pairs the two halves of head_dim); `_unpermute` undoes that so the weights fit our
rotate-half RoPE. Qwen2/Qwen3 GGUFs are written without the permutation.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax
import numpy as np

from orchestra_jax.models.hf_io import CheckpointError, assemble_params
from orchestra_jax.models.transformer_config import ConfigFieldError, TransformerConfig

GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name_of(gguf_name: str) -> str | None:
    if gguf_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (head, half, pair) -> (head, pair, half)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader: Any, path: pathlib.Path) -> TransformerConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' (baked-in rope scaling) is not supported")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata field '{arch}.{key}' missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' missing")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    try:
        return TransformerConfig(
            family=arch,
            vocab_size=int(embed.shape[-1]),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in names,
            qk_norm=arch == "qwen3",
            qkv_bias=arch == "qwen2",
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )
    except ConfigFieldError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_gguf(
    path: str | os.PathLike, dtype: Any = "float32", mesh: jax.sharding.Mesh | None = None
) -> tuple[TransformerConfig, dict[str, Any]]:
    """Dequantise a GGUF file into (config, params)."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on corrupt files
        raise CheckpointError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None
    config = config_from_gguf(reader, path)
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name_of(tensor.name)
        if name is not None:
            tensors[name] = tensor

    def read(name: str) -> np.ndarray:
        tensor = tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{path}: tensor for {name!r} missing from the GGUF file")
        try:
            w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
            w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {tensor.name!r}: cannot dequantise ({e})") from None
        if config.family == "llama" and name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif config.family == "llama" and name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        return w

    return config, assemble_params(config, read, dtype=dtype, mesh=mesh)


def gguf_tokenizer_files(path: str | os.PathLike) -> dict[str, Any]:
    """The vocabulary a GGUF carries: tokens, merges, special-token ids and chat template (for the tokenizer)."""
    import gguf

    reader = gguf.GGUFReader(pathlib.Path(path))
    keys = ("tokens", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "model", "pre")
    out = {key: _field(reader, f"tokenizer.ggml.{key}") for key in keys}
    out["chat_template"] = _field(reader, "tokenizer.chat_template")
    return out
