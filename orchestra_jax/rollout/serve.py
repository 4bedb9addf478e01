"""`orchestra-jax serve`: load a checkpoint (or a preset with random weights) and serve it over HTTP."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.rollout.server import ServedModel, create_app


@dataclass(frozen=True)
class ServeArgs:
    """`orchestra-jax serve` flags (SGLang's names where SGLang has the flag)."""

    model_path: str
    """A checkpoint directory (HF safetensors + config.json), a .gguf file, or a models preset name (random weights)."""
    tokenizer_path: str | None = None
    """tokenizer.json or its directory; defaults to the model directory when it holds one."""
    host: str = "127.0.0.1"
    port: int = 30000
    context_length: int = 2048
    max_running_requests: int = 16
    dtype: str = "float32"
    random_seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None
    """Chat template family: qwen3 or smollm2 (default: smollm2 for llama models, else qwen3)."""
    weight_version: str = "default"
    log_level: str = "warning"


def load_served_model(args: ServeArgs) -> ServedModel:
    """Weights, tokenizer and engine for `serve`. Raises ValueError with a one-line message."""
    import jax

    from orchestra_jax import models
    from orchestra_jax.models import tokenizer as tokenizer_lib
    from orchestra_jax.models.chat_template import family_of

    path = pathlib.Path(args.model_path)
    tok = None
    tokenizer_path = args.tokenizer_path
    if tokenizer_path is None and (path / "tokenizer.json").is_file():
        tokenizer_path = str(path)
    if tokenizer_path is None and path.suffix == ".gguf":
        tokenizer_path = str(path)
    if tokenizer_path is not None:
        tok = tokenizer_lib.Tokenizer.from_file(tokenizer_path)
    if path.exists():
        config, params = models.load_pretrained(str(path), dtype=args.dtype)
    else:
        try:
            config = models.get_preset(args.model_path, tok.vocab_size if tok else None)
        except ValueError as e:
            raise ValueError(f"--model-path {args.model_path!r}: not a checkpoint path and {e}") from None
        params = models.init_params(config, jax.random.key(args.random_seed), dtype=args.dtype)
    engine = EmbeddedEngine(
        config,
        params,
        max_slots=args.max_running_requests,
        max_context=args.context_length,
        weight_version=args.weight_version,
        detokenize=tok.decode if tok else None,
        seed=args.random_seed,
    )
    return ServedModel(
        engine=engine,
        tokenizer=tok,
        model_path=args.model_path,
        served_model_name=args.served_model_name or path.name,
        chat_family=args.chat_template or family_of(config.family),
        load_weights=lambda p: models.load_pretrained(p, dtype=args.dtype),
    )


def serve(args: ServeArgs, served: ServedModel | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    served = served or load_served_model(args)
    print(
        f"serving {served.model_path} on http://{args.host}:{args.port} (weight_version {args.weight_version})"
    )
    uvicorn.run(create_app(served), host=args.host, port=args.port, log_level=args.log_level)
