"""The policy: a pure-functional Qwen3/Llama/Qwen2 transformer, its HF and GGUF checkpoint mappings, tokenizer and chat template."""

from orchestra_jax.models.flax_module import TransformerLM
from orchestra_jax.models.hf_io import CheckpointError, load_pretrained, save_pretrained
from orchestra_jax.models.transformer import (
    forward,
    hidden_states,
    init_kv_cache,
    init_params,
    lm_head_weight,
    param_logical_axes,
)
from orchestra_jax.models.transformer_config import TransformerConfig, from_hf_config, get_preset

__all__ = [
    "CheckpointError",
    "load_pretrained",
    "save_pretrained",
    "TransformerConfig",
    "TransformerLM",
    "forward",
    "from_hf_config",
    "get_preset",
    "hidden_states",
    "init_kv_cache",
    "init_params",
    "lm_head_weight",
    "param_logical_axes",
]
