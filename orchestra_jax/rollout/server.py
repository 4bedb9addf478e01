"""An SGLang-compatible HTTP server over the embedded sampler (`orchestra-jax serve`).

SGLang's native API (field names as in SGLang's `io_struct.py`: /generate, weight updates, pause/continue,
abort, health, model/server info) so `SGLangEngine` talks to this server and to real SGLang alike, plus the
OpenAI-compatible /v1/chat/completions and /v1/completions so the same server can host expert models for tools.

Bad requests get HTTP 400 with a one-line message; the server keeps serving others. Not supported (400):
streaming, n > 1, penalties, constrained decoding. `pause_generation` mode 'retract' behaves like 'in_place'
(requests stay in their slots and resume on `continue_generation`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from orchestra_jax.rollout.engine import Completion, GenerateRequest, RequestError, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine

VERSION = "orchestra-jax-0.1.0"
_GENERATE_FIELDS = {
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "rid", "stream", "return_output_logprob_only", "token_ids_logprob",
}  # fmt: skip


@dataclass
class ServedModel:
    """What the server needs beside the engine: a tokenizer (for text and chat) and a weight loader."""

    engine: EmbeddedEngine
    tokenizer: Any | None  # models.tokenizer.Tokenizer
    model_path: str
    served_model_name: str
    chat_family: str = "qwen3"
    load_weights: Callable[[str], tuple[Any, Any]] | None = None  # path -> (TransformerConfig, params)


class BadRequest(Exception):
    pass


def _fail(message: str) -> BadRequest:
    return BadRequest(message)


def create_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="orchestra-jax serve")
    engine = served.engine

    @app.exception_handler(BadRequest)
    @app.exception_handler(RequestError)
    async def bad_request(_: Request, exc: Exception) -> JSONResponse:
        message = str(exc)
        return JSONResponse(
            status_code=400, content={"error": {"message": message, "type": "BadRequestError", "code": 400}}
        )

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _fail(f"{request.url.path}: body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise _fail(f"{request.url.path}: body must be a JSON object")
        return body

    def tokenizer(where: str):
        if served.tokenizer is None:
            raise _fail(f"{where}: this server has no tokenizer (start it with --tokenizer-path)")
        return served.tokenizer

    # ---- SGLang native API -----------------------------------------------------------------------------------

    @app.post("/generate")
    async def generate(request: Request):
        body = await body_of(request)
        unknown = set(body) - _GENERATE_FIELDS
        if unknown:
            raise _fail(f"/generate: unknown field(s) {sorted(unknown)}")
        if body.get("stream"):
            raise _fail("/generate: stream=true is not supported")
        if body.get("top_logprobs_num") or body.get("token_ids_logprob"):
            raise _fail("/generate: top_logprobs_num and token_ids_logprob are not supported")
        prompts, single = _prompts(body, lambda: tokenizer("/generate text"))
        n = len(prompts)
        params = _per_item(body.get("sampling_params"), n, "sampling_params", dict)
        rids = _per_item(body.get("rid"), n, "rid", str)
        reqs = [
            GenerateRequest(
                tuple(p), SamplingParams.from_sglang(sp, f"sampling_params[{i}]"), rid or uuid.uuid4().hex
            )
            for i, (p, sp, rid) in enumerate(zip(prompts, params, rids))
        ]
        completions = await engine.generate(reqs)
        out = [_generate_response(c, sp or {}, body, served.tokenizer) for c, sp in zip(completions, params)]
        return out[0] if single else out

    @app.get("/health")
    async def health():
        ok = await engine.health()
        return PlainTextResponse("", status_code=200 if ok else 503)

    @app.get("/health_generate")
    async def health_generate():
        if not await engine.health():
            return PlainTextResponse(f"engine failed: {engine.failure}", status_code=503)
        probe = GenerateRequest(
            (0,), SamplingParams(max_new_tokens=1, temperature=0.0), f"health-{uuid.uuid4().hex}"
        )
        try:
            await asyncio.wait_for(engine.generate([probe]), timeout=60)
        except TimeoutError:
            return PlainTextResponse("generation timed out", status_code=503)
        return PlainTextResponse("", status_code=200)

    @app.get("/get_model_info")
    async def get_model_info():
        return {
            "model_path": served.model_path,
            "tokenizer_path": served.model_path if served.tokenizer is not None else None,
            "is_generation": True,
            "model_type": engine.config.family,
            "weight_version": engine.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    @app.get("/get_server_info")
    async def get_server_info():
        return {
            "version": VERSION,
            "model_path": served.model_path,
            "served_model_name": served.served_model_name,
            "context_length": engine.max_context,
            "max_running_requests": engine.max_slots,
            "weight_version": engine.weight_version,
            "num_running_requests": engine.num_running,
            "internal_states": [{"stats": dict(engine.stats)}],
        }

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": engine.weight_version}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if engine.num_running:
            return PlainTextResponse("Cache not flushed: requests are running.", status_code=400)
        engine.flush_cache()
        return PlainTextResponse("Cache flushed.", status_code=200)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        body = await body_of(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise _fail("/update_weights_from_disk: model_path must be a non-empty string")
        if served.load_weights is None:
            raise _fail("/update_weights_from_disk: this server cannot load weights")
        if body.get("abort_all_requests"):
            engine.abort()
        try:
            config, params = await asyncio.to_thread(served.load_weights, path)
            if config.vocab_size != engine.config.vocab_size or config.num_layers != engine.config.num_layers:
                raise ValueError(f"{path}: model shape differs from the served model")
            version = body.get("weight_version") or engine.weight_version
            await engine.update_weights(params, str(version))
        except Exception as e:  # a bad path or checkpoint must not take the server down
            message = f"Failed to update weights from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            return JSONResponse(status_code=400, content={"success": False, "message": message})
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await body_of(request) if await request.body() else {}
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise _fail(f"/pause_generation: mode {mode!r} is not one of abort, retract, in_place")
        if mode == "abort":
            engine.abort()
        engine.pause()
        return {"success": True, "message": f"Generation paused ({mode})."}

    @app.post("/continue_generation")
    async def continue_generation():
        engine.resume()
        return {"success": True, "message": "Generation continued."}

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await body_of(request)
        if body.get("abort_all"):
            count = engine.abort()
        elif isinstance(body.get("rid"), str):
            count = engine.abort(body["rid"])
        else:
            raise _fail("/abort_request: give rid (a string) or abort_all=true")
        return {"success": True, "num_aborted": count}

    # ---- OpenAI-compatible API -------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models():
        card = {"id": served.served_model_name, "object": "model", "owned_by": "orchestra-jax"}
        return {"object": "list", "data": [dict(card, max_model_len=engine.max_context)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = tokenizer("/v1/completions").encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise _fail("/v1/completions: prompt must be a non-empty string or a list of token ids")
        [c] = await engine.generate(
            [GenerateRequest(tuple(ids), _openai_sampling(body, 16), _openai_id("cmpl"))]
        )
        text = served.tokenizer.decode(c.output_ids, skip_special_tokens=True) if served.tokenizer else ""
        choice = {"index": 0, "text": _trim_stop(text, c, body.get("stop")), "finish_reason": c.finish_reason}
        choice["logprobs"] = (
            {"token_logprobs": list(c.logprobs), "tokens": list(c.output_ids)}
            if body.get("logprobs")
            else None
        )
        return _openai_envelope(c, "text_completion", served.served_model_name, [choice])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from orchestra_jax.models import chat_template, tool_parser

        body = await body_of(request)
        tok = tokenizer("/v1/chat/completions")
        messages, tools = body.get("messages"), body.get("tools")
        if not isinstance(messages, list) or not messages:
            raise _fail("/v1/chat/completions: messages must be a non-empty list")
        kwargs = body.get("chat_template_kwargs") or {}
        try:
            text = chat_template.render(
                messages, tools=tools, add_generation_prompt=True,
                enable_thinking=bool(kwargs.get("enable_thinking", True)), family=served.chat_family,
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            raise _fail(f"/v1/chat/completions: {e}") from None
        sampling = _openai_sampling(body, 1024)
        [c] = await engine.generate(
            [GenerateRequest(tuple(tok.encode(text)), sampling, _openai_id("chatcmpl"))]
        )
        ids = [t for t in c.output_ids if t not in tok.eos_token_ids]
        turn = tool_parser.parse_tool_calls(_trim_stop(tok.decode(ids), c, body.get("stop")))
        message: dict[str, Any] = {"role": "assistant", "content": turn.content or None}
        if turn.reasoning:
            message["reasoning_content"] = turn.reasoning
        finish = c.finish_reason
        if turn.calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": call.name,
                        "arguments": json.dumps(call.arguments, ensure_ascii=False),
                    },
                }
                for call in turn.calls
            ]
            finish = "tool_calls" if finish == "stop" else finish
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return _openai_envelope(c, "chat.completion", served.served_model_name, [choice])

    return app


def _prompts(body: dict, get_tokenizer: Callable[[], Any]) -> tuple[list[list[int]], bool]:
    """The prompts of a /generate body as token ids, and whether it was a single (non-batch) request."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise _fail("/generate: give exactly one of text and input_ids")
    if ids is not None:
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            return ids, False
        if isinstance(ids, list):
            return [ids], True
        raise _fail("/generate: input_ids must be a list of token ids or a list of such lists")
    if isinstance(text, str):
        return [get_tokenizer().encode(text)], True
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        tok = get_tokenizer()
        return [tok.encode(t) for t in text], False
    raise _fail("/generate: text must be a string or a list of strings")


def _per_item(value: Any, n: int, name: str, kind: type) -> list:
    if value is None or isinstance(value, kind):
        if n > 1 and isinstance(value, str):
            raise _fail(f"/generate: a batch of {n} needs {name} as a list")
        return [value] * n
    if isinstance(value, list) and len(value) == n and all(v is None or isinstance(v, kind) for v in value):
        return value
    raise _fail(f"/generate: {name} must be a {kind.__name__} or a list of {n}")


def _generate_response(c: Completion, sampling: dict, body: dict, tokenizer: Any | None) -> dict:
    skip = sampling.get("skip_special_tokens", True)
    text = tokenizer.decode(c.output_ids, skip_special_tokens=skip) if tokenizer is not None else ""
    if not sampling.get("no_stop_trim"):
        text = _trim_stop(text, c, sampling.get("stop"))
    finish: dict[str, Any] = {"type": c.finish_reason}
    if c.finish_reason == "stop" and c.output_ids:
        finish["matched"] = c.output_ids[-1]
    elif c.finish_reason == "length":
        finish["length"] = c.completion_tokens
    meta = {
        "id": c.rid,
        "finish_reason": finish,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "cached_tokens": c.cached_tokens,
        "weight_version": c.weight_version,
        "e2e_latency": c.latency_s,
    }
    if body.get("return_logprob"):
        with_text = body.get("return_text_in_logprobs") and tokenizer is not None
        meta["output_token_logprobs"] = [
            [lp, t, tokenizer.decode([t]) if with_text else None] for lp, t in zip(c.logprobs, c.output_ids)
        ]
    return {"text": text, "output_ids": list(c.output_ids), "meta_info": meta}


def _trim_stop(text: str, c: Completion, stop: Any) -> str:
    """Cut the text at the first stop string, as SGLang does (output_ids keep every token)."""
    if c.finish_reason != "stop" or not stop:
        return text
    stops = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def _openai_sampling(body: dict, default_max_tokens: int) -> SamplingParams:
    if body.get("stream"):
        raise _fail("stream=true is not supported")
    if body.get("n", 1) not in (1, None):
        raise _fail(f"n={body['n']!r}: only n=1 is supported")
    stop = body.get("stop")
    params = {
        "max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens,
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "top_k": body.get("top_k", -1),
        "min_p": body.get("min_p", 0.0),
        "stop": [stop] if isinstance(stop, str) else (stop or []),
        "seed": body.get("seed"),
    }
    return SamplingParams.from_sglang({k: v for k, v in params.items() if v is not None}, "request")


def _openai_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _openai_envelope(c: Completion, kind: str, model: str, choices: list) -> dict:
    usage = {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }
    return {
        "id": c.rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
