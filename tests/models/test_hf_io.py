"""Parity with transformers on tiny random models of each family, HF round trips, and checkpoint errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from orchestra_jax.models import forward, load_pretrained, save_pretrained  # noqa: E402
from orchestra_jax.models.hf_io import CheckpointError  # noqa: E402
from orchestra_jax.models.safetensors_io import SafetensorsFile  # noqa: E402

fwd = jax.jit(forward, static_argnums=0)
VOCAB = 131


def _hf_model(family: str, seed: int):
    """A random tiny HF model: qwen3 with tied embeddings and head_dim != hidden/heads, llama with llama3 rope
    scaling and GQA 3:1, qwen2 with q/k/v biases and a single KV head."""
    torch.manual_seed(seed)
    if family == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            tie_word_embeddings=True,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        )
        model = transformers.Qwen3ForCausalLM(config)
    elif family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 5e5,
            },
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            rope_theta=1e4,
        )
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # randomise everything, norms and biases included, so each path is exercised
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None])).logits[0].numpy()


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_logits_match_transformers(family, tmp_path):
    seed = np.random.randint(1 << 30)
    rng = np.random.default_rng(seed)
    model = _hf_model(family, seed)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_pretrained(tmp_path / "hf", dtype="float32")
    assert config.family == family and config.num_layers == 2

    # Row 0 packs two sequences (positions restart); row 1 is one sequence right-padded.
    a, b, c = (rng.integers(0, VOCAB, n) for n in (7, 9, 11))
    ids = np.zeros((2, 16), np.int32)
    ids[0, :7], ids[0, 7:16], ids[1, :11] = a, b, c
    segments = np.array([[1] * 7 + [2] * 9, [1] * 11 + [0] * 5])
    positions = np.array([list(range(7)) + list(range(9)), list(range(16))])
    ours = fwd(config, params, ids, positions_BT=positions, segment_ids_BT=segments)
    assert ours.dtype == jnp.float32
    assert _rel_err(ours[0, :7], _hf_logits(model, a)) <= 1e-5
    assert _rel_err(ours[0, 7:], _hf_logits(model, b)) <= 1e-5
    assert _rel_err(ours[1, :11], _hf_logits(model, c)) <= 1e-5

    # KV cache: padded prefill of rows [c[:11], c[:6]], then token-by-token decode of row 1 against HF.
    from orchestra_jax.models import init_kv_cache

    cache = init_kv_cache(config, batch=2, max_len=16)
    prefill_segments = np.array([[1] * 11, [1] * 6 + [0] * 5])
    logits, cache = fwd(
        config, params, ids[1:].repeat(2, 0)[:, :11], segment_ids_BT=prefill_segments, kv_cache=cache
    )
    full_c = _hf_logits(model, c)
    assert _rel_err(logits[1, :6], full_c[:6]) <= 1e-5
    for t in range(6, 11):
        step, cache = fwd(config, params, np.array([[c[t]], [c[t]]]), positions_BT=np.array([[11], [t]]),
                          kv_cache=cache)  # fmt: skip
        assert _rel_err(step[1, 0], full_c[t]) <= 1e-5


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(family, tmp_path):
    seed = np.random.randint(1 << 30)
    model = _hf_model(family, seed)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_pretrained(tmp_path / "hf")
    save_pretrained(config, params, tmp_path / "ours", max_shard_bytes=40_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()  # sharded on purpose
    original = SafetensorsFile(tmp_path / "hf" / "model.safetensors")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {k for k in original.keys() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(index) == expected
    for name in expected:
        mine = SafetensorsFile(tmp_path / "ours" / index[name]).read(name)
        ref = original.read(name)
        assert mine.dtype == ref.dtype and mine.tobytes() == ref.tobytes(), name
    reloaded = type(model).from_pretrained(tmp_path / "ours").eval()
    ids = np.random.default_rng(seed).integers(0, VOCAB, 9)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids), _hf_logits(model, ids))
    config2, params2 = load_pretrained(tmp_path / "ours")
    assert config2 == config
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


def test_bfloat16_load_keeps_the_file_bits(tmp_path):
    model = _hf_model("qwen3", 0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_pretrained(tmp_path / "hf", dtype=jnp.bfloat16)
    assert params["layers"]["q"].dtype == jnp.bfloat16
    save_pretrained(config, params, tmp_path / "out")
    a, b = (
        SafetensorsFile(tmp_path / "hf" / "model.safetensors"),
        SafetensorsFile(tmp_path / "out" / "model.safetensors"),
    )
    assert all(a.read(k).tobytes() == b.read(k).tobytes() for k in b.keys())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def saved_qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    _hf_model("qwen2", 1).save_pretrained(path, max_shard_size="20KB")
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_and_unknown_config_fields(saved_qwen2, tmp_path):
    path = _copy(saved_qwen2, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'hidden_size'"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="mamba")))
    with pytest.raises(CheckpointError, match=r"config\.json.*'mamba'"):
        load_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json:1"):
        load_pretrained(path)


def test_shape_mismatch_names_tensor(saved_qwen2, tmp_path):
    path = _copy(saved_qwen2, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=72)))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*shape"):
        load_pretrained(path)


def test_missing_shard_and_corrupt_file(saved_qwen2, tmp_path):
    path = _copy(saved_qwen2, tmp_path / "m")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}: shard missing \(holds tensor"):
        load_pretrained(path)
    path = _copy(saved_qwen2, tmp_path / "c")
    victim = sorted(path.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: tensor '.*'"):
        load_pretrained(path)
    victim.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=rf"{victim.name}: corrupt safetensors header"):
        load_pretrained(path)


def test_save_failure_leaves_nothing_half_written(saved_qwen2, tmp_path, monkeypatch):
    from orchestra_jax.models import hf_io

    config, params = load_pretrained(saved_qwen2)
    save_pretrained(config, params, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(CheckpointError, match=r"out: params do not match.*\['final_norm'\]"):
        save_pretrained(config, dict(params, final_norm=jnp.zeros((3,))), tmp_path / "out")
    real_to_hf = hf_io.to_hf

    def failing_to_hf(key, w):  # fails after the first shard file has been partly written
        if key == "final_norm":
            raise OSError("disk full")
        return real_to_hf(key, w)

    monkeypatch.setattr(hf_io, "to_hf", failing_to_hf)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(config, jax.tree.map(lambda x: x + 1, params), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _same_tensors(dir_a, dir_b):
    from orchestra_jax.models.hf_io import _tensor_index

    a, b = _tensor_index(dir_a), _tensor_index(dir_b)
    assert set(a) == set(b)
    return all(a[k].read(k).tobytes() == b[k].read(k).tobytes() for k in a)


def test_convert_cli_hf_orbax_hf_round_trip(saved_qwen2, tmp_path, capsys):
    from orchestra_jax.cli import main

    src = _copy(saved_qwen2, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"model": "stand-in"}')  # tokenizer files travel verbatim
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "orb"), "--to", "orbax"]) == 0
    assert (tmp_path / "orb" / "params").is_dir() and (tmp_path / "orb" / "config.json").is_file()
    assert main(["convert", "--src", str(tmp_path / "orb"), "--dst", str(tmp_path / "back")]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert _same_tensors(saved_qwen2, tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"model": "stand-in"}'
    assert (
        main(["convert", "--src", str(saved_qwen2), "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
        == 0
    )
    config, params = load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert params["embed"].dtype == jnp.bfloat16


def test_convert_training_checkpoint_uses_the_run_config(tmp_path, capsys):
    from orchestra_jax.cli import main
    from orchestra_jax.models import get_preset, init_params
    from orchestra_jax.models.params_io import load_params, save_params

    config = get_preset("qwen3-tiny", vocab_size=72)
    params = init_params(config, jax.random.key(np.random.randint(1 << 30)))
    run = tmp_path / "run"
    save_params(params, run / "ckpt" / "3" / "params")
    restored = load_params(run / "ckpt" / "3" / "params")
    assert all(
        bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(restored))
    )
    assert main(["convert", "--src", str(run / "ckpt"), "--dst", str(tmp_path / "hf")]) == 2
    assert "pass --model" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps({"model": {"source": "qwen3-tiny"}}))
    assert main(["convert", "--src", str(run / "ckpt"), "--dst", str(tmp_path / "hf")]) == 0
    config2, params2 = load_pretrained(tmp_path / "hf")
    assert config2.vocab_size == 72 and config2.tie_word_embeddings
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


def test_convert_bad_input_is_one_line(tmp_path, capsys):
    from orchestra_jax.cli import main

    assert main(["convert", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope: no such file or directory" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["convert", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "out")]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synthetic_benchmark_checkpoint_loads(tmp_path):
    from orchestra_jax.models import get_preset
    from orchestra_jax.models.load_benchmark import write_synthetic_checkpoint

    config = get_preset("qwen2-tiny", vocab_size=200)
    nbytes = write_synthetic_checkpoint(config, tmp_path / "s", "bfloat16", max_shard_bytes=60_000)
    assert nbytes == 2 * config.num_params() and len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    loaded_config, params = load_pretrained(tmp_path / "s", dtype="bfloat16")
    assert loaded_config == config
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
