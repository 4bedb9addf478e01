"""Hugging Face checkpoint directories <-> (TransformerConfig, params).

Loading goes tensor by tensor: each stacked parameter is assembled in one host buffer of the target dtype,
placed on its devices (with the mesh's sharding when given), and freed before the next, so host memory
peaks at the placed params plus one stacked parameter, never a second full copy. Saving writes HF names and
layouts ([out, in] linear weights) into a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orchestra_jax.models import transformer
from orchestra_jax.models.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from orchestra_jax.models.transformer_config import ConfigFieldError, TransformerConfig, from_hf_config

MAX_SHARD_BYTES = 4 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the one-line message names the file and tensor."""


# Our per-layer name -> HF name inside `model.layers.{i}.`
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


def hf_name(key: str, layer: int | None) -> str:
    return TOP_NAMES[key] if layer is None else f"model.layers.{layer}.{LAYER_NAMES[key]}"


def to_ours(key: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF layout -> ours: linear weights are stored [out, in]; ours are [in, out] with heads as an axis."""
    if key in ("q", "k", "v"):
        return w.T.reshape(shape)
    if key == "o":
        return w.T.reshape(shape)
    if key in ("gate", "up", "down", "lm_head"):
        return w.T
    return w.reshape(shape)


def to_hf(key: str, w: np.ndarray) -> np.ndarray:
    if key in ("q", "k", "v"):
        return w.reshape(w.shape[0], -1).T
    if key == "o":
        return w.reshape(-1, w.shape[-1]).T
    if key in ("gate", "up", "down", "lm_head"):
        return w.T
    return w.reshape(-1) if key.endswith("_bias") else w


def hf_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one of our (unstacked) weights."""
    return to_hf(key, np.empty(shape, np.uint8)).shape


def assemble_params(
    config: TransformerConfig,
    read: Callable[[str], np.ndarray],
    dtype: Any = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Build params from `read(hf_name) -> array in HF layout`, one stacked parameter at a time."""
    target = np.dtype(jnp.dtype(dtype))
    shapes = transformer.param_shapes(config)
    if mesh is not None:
        from orchestra_jax.parallel.mesh import tree_shardings

        shardings = tree_shardings(mesh, transformer.param_logical_axes(config))
    else:
        device = jax.devices()[0]
        shardings = jax.tree.map(lambda _: device, shapes, is_leaf=lambda x: isinstance(x, tuple))

    def load_one(key: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
        name = hf_name(key, layer)
        w = read(name)
        if w.shape != hf_shape(key, shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {w.shape}, config expects {hf_shape(key, shape)}"
            )
        return to_ours(key, w, shape)

    # The embedding first: its transient copies then coincide with the fewest already-placed params.
    params: dict[str, Any] = {}
    for key in [k for k in shapes if k != "layers"]:
        params[key] = jax.device_put(
            load_one(key, None, shapes[key]).astype(target, copy=False), shardings[key]
        )
    params["layers"] = {}
    for key, shape in shapes["layers"].items():
        buffer = np.empty(shape, target)
        for layer in range(config.num_layers):
            buffer[layer] = load_one(key, layer, shape[1:])
        params["layers"][key] = jax.block_until_ready(jax.device_put(buffer, shardings["layers"][key]))
        del buffer
    return params


def read_config(directory: pathlib.Path) -> TransformerConfig:
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a HF checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        return from_hf_config(hf, source=str(path))
    except ConfigFieldError as e:
        raise CheckpointError(str(e)) from None


def _tensor_index(directory: pathlib.Path) -> dict[str, SafetensorsFile]:
    """HF tensor name -> the file holding it (single file, or the shards an index names)."""
    index_path = directory / "model.safetensors.index.json"
    try:
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map)") from None
            files = {}
            for shard in sorted(set(weight_map.values())):
                if not (directory / shard).is_file():
                    missing = next(n for n, s in weight_map.items() if s == shard)
                    raise CheckpointError(f"{directory / shard}: shard missing (holds tensor {missing!r})")
                files[shard] = SafetensorsFile(directory / shard)
            return {name: files[shard] for name, shard in weight_map.items()}
        single = directory / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        file = SafetensorsFile(single)
        return {name: file for name in file.keys()}
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def load_pretrained(
    path: str | os.PathLike, dtype: Any = "float32", mesh: jax.sharding.Mesh | None = None
) -> tuple[TransformerConfig, dict[str, Any]]:
    """Load a HF checkpoint directory (or a `.gguf` file) as (config, params) in `dtype`, sharded over `mesh`."""
    path = pathlib.Path(path)
    if path.suffix == ".gguf":
        from orchestra_jax.models import gguf_io

        return gguf_io.load_gguf(path, dtype=dtype, mesh=mesh)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory or .gguf file")
    config = read_config(path)
    index = _tensor_index(path)

    def read(name: str) -> np.ndarray:
        if name not in index:
            raise CheckpointError(f"{path}: tensor {name!r} missing from the checkpoint")
        try:
            return index[name].read(name)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None

    try:
        params = assemble_params(config, read, dtype=dtype, mesh=mesh)
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    return config, params


def _hf_tensors(config: TransformerConfig, params: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """(HF name, our key, layer) in HF's usual order."""
    out = [(TOP_NAMES["embed"], "embed", None)]
    for layer in range(config.num_layers):
        out += [(hf_name(key, layer), key, layer) for key in LAYER_NAMES if key in params["layers"]]
    out.append((TOP_NAMES["final_norm"], "final_norm", None))
    if not config.tie_word_embeddings:
        out.append((TOP_NAMES["lm_head"], "lm_head", None))
    return out


def save_pretrained(
    config: TransformerConfig,
    params: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> pathlib.Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`) that transformers loads.

    `tokenizer` (anything with `.save(dir)`) adds its files. The directory appears complete or not at all.
    """
    out_dir = pathlib.Path(out_dir)
    expected = transformer.param_shapes(config)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if got != expected:
        wrong = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            jax.tree.map(lambda a, b: a == b, got, expected, is_leaf=lambda x: isinstance(x, tuple)))[0]
            if not _]  # fmt: skip
        raise CheckpointError(
            f"{out_dir}: params do not match the config's shapes (at {', '.join(wrong) or 'tree'})"
        )
    entries = []
    for name, key, layer in _hf_tensors(config, params):
        array = params[key] if layer is None else params["layers"][key]
        shape = tuple(array.shape if layer is None else array.shape[1:])
        entries.append((name, key, layer, np.dtype(array.dtype), hf_shape(key, shape)))
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[3].itemsize * int(np.prod(entry[4]))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    by_name = {e[0]: e for e in entries}

    def produce(name: str) -> np.ndarray:
        _, key, layer, _, _ = by_name[name]
        array = params[key] if layer is None else params["layers"][key][layer]
        return to_hf(key, np.asarray(jax.device_get(array)))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from a server running as another user
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            total += write_safetensors(tmp / file, [(e[0], e[3], e[4]) for e in shard], produce)
            weight_map.update({e[0]: file for e in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = config.to_hf_config()
        hf_config["torch_dtype"] = str(jnp.dtype(params["embed"].dtype))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
    """Rename `new` onto `target`; an existing target is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
