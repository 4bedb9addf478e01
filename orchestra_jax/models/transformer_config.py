"""One config for the Qwen3 / Llama / Qwen2 decoder family, and its mapping to and from HF `config.json`.

The families differ only by switches: Qwen3 has per-head q/k RMSNorm, Qwen2 has q/k/v biases, Llama has
neither (and Llama 3 brings its own rope scaling). So one dataclass and one forward function cover all three.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("qwen3", "llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


class ConfigFieldError(ValueError):
    """A HF config that is missing a field, or names a family or setting this model does not implement."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # None, or sorted (key, value) pairs of HF's rope scaling dict (hashable, so configs can be jit-static).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigFieldError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigFieldError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigFieldError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            rope_type = dict(self.rope_scaling).get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ConfigFieldError(
                    f"rope_scaling type {rope_type!r} is not supported (choose from {ROPE_TYPES})"
                )

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        per_layer += h * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        per_layer += 2 * h if self.qk_norm else 0
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def train_flops_per_token(self, seq_len: int, *, causal: bool = True) -> float:
        """Model FLOPs of one trained token (forward + backward) at this sequence length: 6 x the matmul weights
        (Q, K, V, O, gate, up, down and the LM head, tied or not; not the embedding lookup, norms or biases) +
        attention's scores and weighted values, 12 x layers x seq_len x heads x head_dim over every key (PaLM's
        6N + 12LHQT), halved for the keys a causal mask leaves out (as MaxText and NeMo count). causal=False gives
        the dense count that PaLM, nanoGPT and torchtitan report MFU with, for comparing with them."""
        d, h = self.hidden_size, self.head_dim
        per_layer = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * d * self.intermediate_size
        matmul = self.num_layers * per_layer + d * self.vocab_size
        attention = 12 * self.num_layers * seq_len * self.num_heads * h
        return 6 * matmul + (attention // 2 if causal else attention)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) reads as this model."""
        arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            self.family
        ]
        eos: int | list[int] | None = list(self.eos_token_ids) if self.eos_token_ids else None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "attention_bias": False,
            "use_cache": True,
        }
        if self.family == "llama":
            out["mlp_bias"] = False
        return out


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """transformers 5 writes `rope_parameters` (theta inside); 4.x and the Hub write rope_theta + rope_scaling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))
    return float(theta), (frozen or None)


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> TransformerConfig:
    """Read a HF config dict. Raises ConfigFieldError naming `source` and the field."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConfigFieldError(f"{source}: model_type {family!r} is not supported (choose from {FAMILIES})")
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if not isinstance(hf.get(field), int):
            raise ConfigFieldError(f"{source}: field {field!r} is missing or not an integer")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigFieldError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise ConfigFieldError(f"{source}: sliding-window attention layers are not supported")
    if hf.get("mlp_bias"):
        raise ConfigFieldError(f"{source}: mlp_bias=true is not supported")
    if family != "qwen2" and hf.get("attention_bias"):
        raise ConfigFieldError(f"{source}: attention_bias=true is not supported for {family}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (int(eos),))
    theta, scaling = _rope_from_hf(hf)
    try:
        return TransformerConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            qkv_bias=family == "qwen2",
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except ConfigFieldError as e:
        raise ConfigFieldError(f"{source}: {e}") from None


def _qwen3(hidden: int, inter: int, layers: int, heads: int, tie: bool) -> TransformerConfig:
    return TransformerConfig(
        family="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, qk_norm=True, max_position_embeddings=40960, bos_token_id=151643,
        eos_token_ids=(151645, 151643),
    )  # fmt: skip


def _tiny(family: str, vocab_size: int) -> TransformerConfig:
    """A few-hundred-thousand-parameter model per family; head_dim != hidden/heads on purpose for qwen3."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=2048, bos_token_id=None, eos_token_ids=())  # fmt: skip
    if family == "qwen3":
        # rope_theta 1e4, not Qwen3's 1e6: with head_dim 32 on sequences of a few hundred tokens, 1e6 leaves
        # almost no fast-rotating pairs to tell neighbours apart, and the CPU demo's policy learned to copy
        # numbers far more slowly with it (notes/DEMO_NOTES.md).
        return TransformerConfig(family="qwen3", head_dim=32, rope_theta=1e4, tie_word_embeddings=True,
                                 qk_norm=True, **common)  # fmt: skip
    if family == "qwen2":
        return TransformerConfig(family="qwen2", head_dim=16, rope_theta=1e6, qkv_bias=True, **common)
    scaling = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
               ("original_max_position_embeddings", 256), ("rope_type", "llama3"))  # fmt: skip
    return TransformerConfig(family="llama", head_dim=16, rope_theta=5e5, rope_scaling=scaling,
                             rms_norm_eps=1e-5, **common)  # fmt: skip


PRESETS = {
    "qwen3-tiny": lambda v: _tiny("qwen3", v),
    "llama-tiny": lambda v: _tiny("llama", v),
    "qwen2-tiny": lambda v: _tiny("qwen2", v),
    "qwen3-0.6b": lambda v: _qwen3(1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": lambda v: _qwen3(2048, 6144, 28, 16, tie=True),
    "qwen3-4b": lambda v: _qwen3(2560, 9728, 36, 32, tie=True),
    "qwen3-8b": lambda v: _qwen3(4096, 12288, 36, 32, tie=False),
    "qwen3-14b": lambda v: _qwen3(5120, 17408, 40, 40, tie=False),
    "qwen3-32b": lambda v: _qwen3(5120, 25600, 64, 64, tie=False),
    "smollm2-135m": lambda v: TransformerConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}


def get_preset(name: str, vocab_size: int | None = None) -> TransformerConfig:
    """A named architecture. `vocab_size` resizes the embedding (tiny presets default to 512)."""
    if name not in PRESETS:
        raise ConfigFieldError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    config = PRESETS[name](vocab_size or 512)
    if vocab_size is not None and vocab_size != config.vocab_size:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    return config
