"""The Flax (linen) face of the decoder: `init` builds the same params tree as `init_params`, `apply` runs it.

There is one implementation, the pure functions in transformer.py; this module only declares their params as
Flax variables, so code written against Flax (`model.init`, `model.apply({"params": p}, ...)`) and code written
against the functions share checkpoints, sharding rules and HF mappings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from orchestra_jax.models import transformer
from orchestra_jax.models.transformer_config import TransformerConfig


class TransformerLM(nn.Module):
    config: TransformerConfig
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, token_ids_BT: jax.Array, *, return_hidden: bool = False, **kwargs: Any) -> Any:
        """Logits [B, T, V] (fp32), or (hidden [B, T, D], kv_cache) with return_hidden; kwargs as hidden_states."""
        params = {
            name: self.param(name, lambda key, name=name: transformer.init_params(self.config, key, self.param_dtype)[name])
            for name in transformer.param_shapes(self.config)
        }
        if return_hidden:
            return transformer.hidden_states(self.config, params, token_ids_BT, **kwargs)
        return transformer.forward(self.config, params, token_ids_BT, **kwargs)
