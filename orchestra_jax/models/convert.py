"""`orchestra-jax convert`: HF directories, GGUF files (read only) and orbax params, each into HF or orbax.

Our orbax export is a directory holding `params/` (the orbax item) and `config.json` (the HF config), so it
converts back without outside knowledge. A training checkpoint (`<run>/ckpt`, `<run>/ckpt/<step>` or its
`params` item) carries no model config: it comes from `model` (a preset name or a HF directory), else from a
`config.json` HF file beside it, else from the run's own config.json (its `model.source` preset, sized to the
saved embedding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Literal

import jax.numpy as jnp

from orchestra_jax.models import hf_io, params_io
from orchestra_jax.models.transformer_config import ConfigFieldError, TransformerConfig, get_preset


@dataclasses.dataclass(frozen=True)
class ConvertArgs:
    """Convert a checkpoint between HF directories, GGUF files (read only) and orbax params."""

    src: str
    """A HF directory, a .gguf file, an orbax export, or a training checkpoint (ckpt dir, step dir or params item)."""
    dst: str
    """Output directory (must not exist for orbax; replaced atomically for hf)."""
    to: Literal["hf", "orbax"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Parameter dtype of the output (default: as stored; GGUF dequantises to float32)."""
    model: str | None = None
    """For training checkpoints: a model preset name or HF directory giving the architecture."""


def params_item_dir(path: pathlib.Path) -> pathlib.Path | None:
    """The orbax params item inside `path` (an item, a step directory, an export, or a ckpt dir: latest step)."""
    if (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists():
        return path
    if (path / "params").is_dir():
        return path / "params"
    steps = (
        sorted((int(p.name), p) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir())
        if path.is_dir()
        else []
    )
    return steps[-1][1] / "params" if steps else None


def _model_config(model: str | None, item: pathlib.Path, vocab_size: int) -> TransformerConfig:
    if model is not None:
        if pathlib.Path(model).is_dir():
            return hf_io.read_config(pathlib.Path(model))
        try:
            return get_preset(model, vocab_size=vocab_size)
        except ConfigFieldError as e:
            raise hf_io.CheckpointError(f"--model: {e}") from None
    for folder in [item.parent, *item.parents]:
        config_json = folder / "config.json"
        if not config_json.is_file():
            continue
        data = json.loads(config_json.read_text())
        if "model_type" in data:
            return hf_io.read_config(folder)
        source = data.get("model", {}).get("source") if isinstance(data.get("model"), dict) else None
        if source:
            return _model_config(source, item, vocab_size)
    raise hf_io.CheckpointError(f"{item}: no model config found beside it; pass --model PRESET|HF_DIR")


def load_any(
    src: str | os.PathLike, dtype: str | None = None, model: str | None = None
) -> tuple[TransformerConfig, Any]:
    """(config, params) from a HF directory, a .gguf file or orbax params. dtype None keeps the stored dtype."""
    src = pathlib.Path(src)
    if not src.exists():
        raise hf_io.CheckpointError(f"{src}: no such file or directory")
    item = None if src.suffix == ".gguf" else params_item_dir(src)
    if item is None:
        if dtype is None and (src / "config.json").is_file():
            stored = json.loads((src / "config.json").read_text())
            stored_dtype = stored.get("torch_dtype") or stored.get("dtype")
            dtype = stored_dtype if stored_dtype in ("float32", "bfloat16", "float16") else None
        return hf_io.load_pretrained(src, dtype=dtype or "float32")
    params = params_io.load_params(item)
    config = _model_config(model, item, int(params["embed"].shape[0]))
    if dtype is not None:
        params = {k: _cast(v, dtype) for k, v in params.items()}
    return config, params


def _cast(tree: Any, dtype: str) -> Any:
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return jnp.asarray(tree).astype(dtype)


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "vocab.json", "merges.txt",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CopiedTokenizer:
    """Tokenizer files copied verbatim from a directory (anything with `save(dir)` suits save_pretrained)."""

    directory: pathlib.Path

    def save(self, out_dir: str | os.PathLike) -> None:
        for name in TOKENIZER_FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, pathlib.Path(out_dir) / name)


def find_tokenizer(src: str | os.PathLike) -> Any:
    """The tokenizer that belongs with `src`: its HF files, a GGUF's vocabulary, or a training run's tokenizer/."""
    src = pathlib.Path(src)
    if src.suffix == ".gguf":
        from orchestra_jax.models.tokenizer import Tokenizer, TokenizerError

        try:
            return Tokenizer.from_file(src)
        except TokenizerError:
            return None
    for folder in [src, *src.parents][:4]:
        for candidate in (folder, folder / "tokenizer"):
            if (candidate / "tokenizer.json").is_file():
                return CopiedTokenizer(candidate)
    return None


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "hf",
    dtype: str | None = None,
    model: str | None = None,
) -> tuple[TransformerConfig, Any, pathlib.Path]:
    """Write `src` (with its tokenizer files when found) to `dst` as a HF directory or an orbax export."""
    if to not in ("hf", "orbax"):
        raise ValueError(f"--to {to!r}: choose hf or orbax")
    dst = pathlib.Path(dst)
    if to == "orbax" and dst.exists():
        raise hf_io.CheckpointError(f"{dst}: already exists")
    config, params = load_any(src, dtype=dtype, model=model)
    tokenizer = find_tokenizer(src)
    if to == "hf":
        hf_io.save_pretrained(config, params, dst, tokenizer=tokenizer)
    else:
        _write_orbax(config, params, dst, tokenizer)
    return config, params, dst


def _write_orbax(config: TransformerConfig, params: Any, dst: pathlib.Path, tokenizer: Any) -> None:
    """`dst/params` (orbax), `dst/config.json` (HF) and tokenizer files, built in a temporary sibling, renamed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        os.chmod(tmp, 0o755)
        params_io.save_params(params, tmp / "params")
        (tmp / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_convert(args: ConvertArgs) -> int:
    """The CLI entry: convert and print one line describing the result."""
    config, params, out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, model=args.model)
    dtype = jnp.dtype(params["embed"].dtype).name
    tokenizer = "with tokenizer" if (out / "tokenizer.json").is_file() else "no tokenizer found"
    print(
        f"wrote {args.to} checkpoint {out} ({config.family}, {config.num_params() / 1e6:.2f}M params, {dtype}, {tokenizer})"
    )
    return 0
