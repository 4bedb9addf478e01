"""RolloutEngine over SGLang servers (or `orchestra-jax serve`): token ids in, token ids and log-probs out.

Each request goes to the server with the fewest requests outstanding from this client. Connection errors,
timeouts and 502/503/504 mark the server down for a back-off and send the request elsewhere; a completion that
comes back aborted (a weight-sync pause, an /abort_request) is resubmitted. Every request yields exactly one
completion, in request order: retries never reach the caller as extra results.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from orchestra_jax.rollout import weight_sync
from orchestra_jax.rollout.engine import Completion, GenerateRequest, RequestError

RETRY_STATUS = {502, 503, 504}


class EngineUnavailable(RuntimeError):
    """No server could complete a request within the allowed attempts."""


@dataclass
class _Server:
    url: str
    outstanding: int = 0
    down_until: float = 0.0
    failures: int = 0


def read_endpoints(path: str | pathlib.Path) -> list[str]:
    """Endpoints from a JSON file {"endpoints": [...]} (what launch/sglang_fleet.py writes) or one URL a line."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read endpoints file ({e.strerror})") from None
    if text.lstrip().startswith("{"):
        try:
            urls = json.loads(text).get("endpoints")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    else:
        urls = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    if (
        not isinstance(urls, list)
        or not urls
        or not all(isinstance(u, str) and u.startswith("http") for u in urls)
    ):
        raise ValueError(f"{path}: expected a non-empty list of http(s) URLs under 'endpoints'")
    return urls


class SGLangEngine:
    """Client engine for one or more SGLang-protocol servers. Use it inside one event loop."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        config: Any = None,
        weight_version: str = "unknown",
        sync_root: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_attempts: int = 8,
        backoff_s: float = 0.2,
        pause_mode: str = "retract",
        verbose: bool = True,
    ):
        if not endpoints:
            raise ValueError("SGLangEngine needs at least one endpoint")
        self.servers = [_Server(url.rstrip("/")) for url in endpoints]
        self.config = config  # a TransformerConfig, needed to export weights for update_weights
        self.weight_version = weight_version
        self.sync_root = sync_root
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.pause_mode = pause_mode
        self.verbose = verbose  # print each weight sync's timing
        self.last_sync: weight_sync.SyncReport | None = None
        self.resubmissions = 0  # completions that came back aborted and were sent again
        self.retries = 0  # attempts lost to a dead, overloaded or timed-out server
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_endpoints_file(cls, path: str, **kwargs: Any) -> SGLangEngine:
        return cls(read_endpoints(path), **kwargs)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=httpx.Limits(max_connections=1024))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- RolloutEngine ---------------------------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[Completion]:
        for request in requests:
            request.sampling.validate(f"request {request.rid!r} sampling")
            if not request.prompt_ids:
                raise RequestError(f"request {request.rid!r}: empty prompt")
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def update_weights(self, params: Any, version: str) -> None:
        """Export `params` as safetensors and load them on every server (pause, update, flush, continue, verify)."""
        if self.config is None:
            raise ValueError(
                "SGLangEngine.update_weights needs the model config (pass config= at construction)"
            )
        self.last_sync = await weight_sync.sync_servers(
            [s.url for s in self.servers], self.config, params, version,
            root=self.sync_root, pause_mode=self.pause_mode, client=self.client,
        )  # fmt: skip
        self.weight_version = version
        if self.verbose:
            print(self.last_sync.summary(), flush=True)

    async def health(self) -> bool:
        async def one(server: _Server) -> bool:
            try:
                return (await self.client.get(server.url + "/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                return False

        return any(await asyncio.gather(*(one(s) for s in self.servers)))

    # ---- one request, with retries -------------------------------------------------------------------------

    def _pick(self) -> _Server:
        now = time.monotonic()
        up = [s for s in self.servers if s.down_until <= now]
        if up:
            return min(up, key=lambda s: s.outstanding)
        return min(self.servers, key=lambda s: s.down_until)

    def _mark_down(self, server: _Server) -> None:
        self.retries += 1
        server.failures += 1
        server.down_until = time.monotonic() + min(self.backoff_s * 2 ** min(server.failures, 6), 10.0)

    async def _generate_one(self, request: GenerateRequest) -> Completion:
        payload = {
            "input_ids": list(request.prompt_ids),
            "sampling_params": request.sampling.to_sglang(),
            "return_logprob": True,
            "logprob_start_len": -1,
        }
        last_error = "no attempt made"
        for attempt in range(self.max_attempts):
            server = self._pick()
            wait = server.down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            rid = request.rid if attempt == 0 else f"{request.rid}.retry{attempt}"
            server.outstanding += 1
            start = time.perf_counter()
            try:
                response = await self.client.post(server.url + "/generate", json=dict(payload, rid=rid))
            except httpx.TransportError as e:  # refused, reset, timed out: try another server
                self._mark_down(server)
                last_error = f"{server.url}: {type(e).__name__}: {e}"
                if isinstance(e, httpx.TimeoutException):
                    await self._abort_quietly(server, rid)
                continue
            finally:
                server.outstanding -= 1
            if response.status_code in RETRY_STATUS:
                self._mark_down(server)
                last_error = f"{server.url}: HTTP {response.status_code}"
                continue
            if response.status_code == 400:
                raise RequestError(f"request {request.rid!r} rejected by {server.url}: {_message(response)}")
            if response.status_code != 200:
                last_error = f"{server.url}: HTTP {response.status_code}: {_message(response)}"
                await asyncio.sleep(self.backoff_s)
                continue
            server.failures = 0
            completion = _completion(
                request, response.json(), time.perf_counter() - start, self.weight_version
            )
            if completion.finish_reason == "abort":
                self.resubmissions += 1
                last_error = f"{server.url}: aborted"
                await asyncio.sleep(self.backoff_s)
                continue
            return completion
        raise EngineUnavailable(
            f"request {request.rid!r}: gave up after {self.max_attempts} attempts ({last_error})"
        )

    async def _abort_quietly(self, server: _Server, rid: str) -> None:
        try:
            await self.client.post(server.url + "/abort_request", json={"rid": rid}, timeout=2.0)
        except httpx.HTTPError:
            pass


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message"))
        return str(body.get("message") or error or body)[:300]
    return str(body)[:300]


def _completion(request: GenerateRequest, body: dict, latency_s: float, version: str) -> Completion:
    """Parse SGLang's /generate response (meta_info.output_token_logprobs: [[logprob, id, text|None], ...]).

    A server that reports no weight_version (sglang-jax 0.1) gets the version this client last synced."""
    meta = body.get("meta_info", {})
    output_ids = tuple(int(t) for t in body.get("output_ids", ()))
    logprob_rows = meta.get("output_token_logprobs") or []
    logprobs = tuple(float(row[0]) for row in logprob_rows)
    if len(logprobs) != len(output_ids):
        raise RuntimeError(
            f"request {request.rid!r}: server returned {len(output_ids)} tokens but {len(logprobs)} log-probs"
        )
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
    return Completion(
        rid=request.rid,
        output_ids=output_ids,
        logprobs=logprobs,
        finish_reason=reason if reason in ("stop", "length", "abort") else "stop",
        prompt_tokens=int(meta.get("prompt_tokens", len(request.prompt_ids))),
        completion_tokens=int(meta.get("completion_tokens", len(output_ids))),
        weight_version=str(meta.get("weight_version") or version),
        latency_s=float(meta.get("e2e_latency", latency_s)),
        cached_tokens=int(meta.get("cached_tokens", 0)),
    )
