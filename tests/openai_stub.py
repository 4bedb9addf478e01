"""A deterministic OpenAI-compatible chat server for tests (FastAPI on 127.0.0.1; no model behind it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def stub_app(
    reply: Callable[[list[dict[str, Any]]], str],
    *,
    api_key: str | None = None,
    fail_first: int = 0,
    usage: bool = True,
) -> FastAPI:
    """`reply(messages) -> text`; the first `fail_first` requests get HTTP 500; `app.state.requests` logs bodies."""
    app = FastAPI()
    app.state.requests = []
    app.state.headers = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        app.state.headers.append(dict(request.headers))
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if len(app.state.requests) <= fail_first:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        text = reply(body["messages"])
        prompt_tokens = sum(len((m.get("content") or "").split()) for m in body["messages"])
        out = {
            "id": f"chatcmpl-{len(app.state.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }
        if usage:
            n = len(text.split())
            out["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
        return out

    return app
