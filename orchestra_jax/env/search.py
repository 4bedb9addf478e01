"""Retrieval for the search tool: local BM25 over a user's corpus, or a server speaking ToolOrchestra's /retrieve.

The /retrieve protocol (ToolOrchestra's retrieval server): POST {"queries": [str], "topk": int, "return_scores":
bool} -> one list per query of {"document": {"id", "contents"}, "score"} (without "score" when not asked).
`retrieval_app` serves it from a BM25 index, `HttpRetriever` speaks it, `LocalRetriever` skips the network.
The BM25 index is built once per corpus and cached on disk under the sha256 of the corpus file.
A web-search provider is a plug-in (`WebSearchProvider`); none is configured by default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import bm25s
import httpx
import pydantic

from orchestra_jax.env.catalog import Tool, ToolContext, ToolResult, error_result

# bm25s sets its own logger to DEBUG, so once anything configures the root logger every index build printed
# "DEBUG:bm25s:Building index from IDs objects" on the console of `orchestra-jax train`.
logging.getLogger("bm25s").setLevel(logging.WARNING)


class CorpusError(ValueError):
    """A corpus file that cannot be read as passages, phrased as one line naming file and place."""


class RetrievalError(RuntimeError):
    """A retrieval server that failed or answered off-protocol, after retries."""


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0

    @property
    def contents(self) -> str:
        """ToolOrchestra's document text: the title on the first line, then the passage."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def _passage(item: Any, index: int, where: str) -> Passage:
    if isinstance(item, str):
        return Passage(str(index), "", item)
    if not isinstance(item, dict):
        raise CorpusError(f"{where}: expected an object with 'text' or 'contents', got {type(item).__name__}")
    text = next((item[k] for k in ("text", "contents", "content", "paragraph_text") if k in item), None)
    if not isinstance(text, str):
        raise CorpusError(f"{where}: no string field 'text', 'contents' or 'content'")
    title = item.get("title", "")
    if not isinstance(title, str):
        raise CorpusError(f"{where}: 'title' must be a string")
    if "title" not in item and "\n" in text and text.startswith('"'):
        title, text = text.split("\n", 1)  # ToolOrchestra/Search-R1 contents: '"Title"\ntext'
        title = title.strip('"')
    return Passage(str(item.get("id", index)), title, text)


def load_corpus(path: str | Path) -> list[Passage]:
    """Passages from JSONL or JSON: a list of {id?, title?, text|contents|content}, or {title: [sentences] | text}."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read corpus {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.suffix == ".jsonl":
        passages = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                passages.append(_passage(item, len(passages), f"{path}:{lineno}"))
    else:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict):
            passages = []
            for title, body in data.items():
                text = (
                    "".join(body)
                    if isinstance(body, list) and all(isinstance(s, str) for s in body)
                    else body
                )
                if not isinstance(text, str):
                    raise CorpusError(f"{path}: entry {title!r} must be a string or a list of sentences")
                passages.append(Passage(str(len(passages)), str(title), text))
        elif isinstance(data, list):
            passages = [_passage(item, i, f"{path}: item {i}") for i, item in enumerate(data)]
        else:
            raise CorpusError(f"{path}: expected a list of passages or an object of title -> text")
    if not passages:
        raise CorpusError(f"{path}: the corpus has no passages")
    return passages


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class BM25Index:
    """bm25s over passages' `contents`; `search` answers a batch of queries."""

    def __init__(self, passages: Sequence[Passage], model: bm25s.BM25):
        self.passages = list(passages)
        self._model = model

    @classmethod
    def build(cls, passages: Sequence[Passage]) -> BM25Index:
        model = bm25s.BM25()
        model.index(
            bm25s.tokenize([p.contents for p in passages], stopwords="en", show_progress=False),
            show_progress=False,
        )
        return cls(passages, model)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        k = max(1, min(int(topk), len(self.passages)))
        tokens = [t if t else ["<empty>"] for t in _tokenize(queries)]
        ids_QK, scores_QK = self._model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [
            [
                dataclasses.replace(self.passages[int(i)], score=float(s))
                for i, s in zip(ids, scores, strict=True)
                if s > 0
            ]
            for ids, scores in zip(ids_QK, scores_QK, strict=True)
        ]

    def save(self, directory: Path) -> None:
        self._model.save(str(directory), show_progress=False)
        with open(directory / "passages.jsonl", "w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: Path) -> BM25Index:
        model = bm25s.BM25.load(str(directory), show_progress=False)
        with open(directory / "passages.jsonl", encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f]
        return cls(passages, model)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ORCHESTRA_CACHE", Path.home() / ".cache" / "orchestra_jax")) / "bm25"


def open_bm25(corpus_path: str | Path, cache_dir: str | Path | None = None) -> BM25Index:
    """Load the cached index of this corpus (keyed by its sha256), building and caching it on first use."""
    corpus_path = Path(corpus_path)
    try:
        digest = hashlib.sha256(corpus_path.read_bytes()).hexdigest()[:24]
    except OSError as e:
        raise CorpusError(f"cannot read corpus {corpus_path}: {e.strerror}") from None
    target = Path(cache_dir or default_cache_dir()) / digest
    if (target / "passages.jsonl").is_file():
        return BM25Index.load(target)
    index = BM25Index.build(load_corpus(corpus_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
    try:
        index.save(staging)
        os.replace(staging, target)  # atomic; a concurrent builder that won the race leaves its copy in place
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return index


class Retriever(Protocol):
    async def retrieve(self, queries: Sequence[str], topk: int) -> list[list[Passage]]: ...


class WebSearchProvider(Protocol):
    """A paid web search (ToolOrchestra used Tavily, $0.01 a query); priced as search kind 'web'."""

    async def retrieve(self, queries: Sequence[str], topk: int) -> list[list[Passage]]: ...


@dataclasses.dataclass
class LocalRetriever:
    index: BM25Index
    kind: str = "local"

    async def retrieve(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        return await asyncio.to_thread(self.index.search, list(queries), topk)


@dataclasses.dataclass
class HttpRetriever:
    """Client of a /retrieve server; connection failures are retried `retries` times, then RetrievalError."""

    url: str
    timeout_s: float = 30.0
    retries: int = 2
    kind: str = "retrieval-server"

    async def retrieve(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        payload = {"queries": list(queries), "topk": int(topk), "return_scores": True}
        endpoint = self.url.rstrip("/") + ("" if self.url.rstrip("/").endswith("/retrieve") else "/retrieve")
        last = ""
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(self.retries + 1):
                try:
                    response = await client.post(endpoint, json=payload)
                    response.raise_for_status()
                    return _parse_retrieval(response.json(), len(payload["queries"]), endpoint)
                except httpx.HTTPStatusError as e:
                    if e.response.status_code < 500:
                        raise RetrievalError(
                            f"retrieval server {endpoint} answered HTTP {e.response.status_code}: "
                            f"{e.response.text[:200]}"
                        ) from None
                    last = f"HTTP {e.response.status_code}"
                    await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
                except httpx.TransportError as e:
                    last = type(e).__name__
                    await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
                except ValueError as e:
                    raise RetrievalError(f"retrieval server {endpoint}: {e}") from None
        raise RetrievalError(
            f"retrieval server {endpoint} unreachable after {self.retries + 1} tries: {last}"
        )


def _parse_retrieval(data: Any, n_queries: int, endpoint: str) -> list[list[Passage]]:
    if isinstance(data, dict) and "result" in data:
        data = data["result"]
    if not isinstance(data, list) or len(data) != n_queries:
        raise ValueError(f"expected one result list per query ({n_queries}), got {str(data)[:80]!r}")
    out = []
    for hits in data:
        passages = []
        for rank, hit in enumerate(hits if isinstance(hits, list) else []):
            doc = hit.get("document", hit) if isinstance(hit, dict) else None
            if not isinstance(doc, dict):
                raise ValueError(f"off-protocol hit {str(hit)[:80]!r}")
            p = _passage(doc, rank, endpoint)
            passages.append(dataclasses.replace(p, score=float(hit.get("score", 0.0))))
        out.append(passages)
    return out


class RetrieveRequest(pydantic.BaseModel):
    """The body of POST /retrieve."""

    queries: list[str] = pydantic.Field(min_length=1, max_length=256)
    topk: int = pydantic.Field(default=10, ge=1)
    return_scores: bool = False


def retrieval_app(index: BM25Index, *, max_topk: int = 100):
    """A FastAPI app serving `index` on POST /retrieve (and GET /health)."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="orchestra-jax retrieval")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "passages": len(index.passages)}

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> list[list[dict[str, Any]]]:
        if request.topk > max_topk:
            raise HTTPException(status_code=422, detail=f"topk={request.topk} exceeds the limit {max_topk}")
        results = index.search(request.queries, request.topk)
        return [
            [
                {"document": {"id": p.id, "contents": p.contents}}
                | ({"score": p.score} if request.return_scores else {})
                for p in hits
            ]
            for hits in results
        ]

    return app


class BackgroundServer:
    """Serve an ASGI app with uvicorn on a thread (tests, notebooks); `url` is known once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


@dataclasses.dataclass(frozen=True)
class RetrievalServerArgs:
    """Serve BM25 over a corpus on ToolOrchestra's /retrieve protocol."""

    corpus: str
    """Passages as JSONL or JSON: [{id?, title?, text|contents}] or {title: text | [sentences]}."""
    host: str = "127.0.0.1"
    port: int = 8000
    cache_dir: str | None = None
    """Where the index is cached (default ~/.cache/orchestra_jax/bm25, or $ORCHESTRA_CACHE/bm25)."""
    max_topk: int = 100


def serve_retrieval(
    index: BM25Index, *, host: str = "127.0.0.1", port: int = 8000, max_topk: int = 100
) -> None:
    """Blocking: serve /retrieve over `index` until interrupted (`BackgroundServer` for a non-blocking one)."""
    import uvicorn

    uvicorn.run(retrieval_app(index, max_topk=max_topk), host=host, port=port, log_level="info")


def format_documents(passages: Sequence[Passage], max_doc_chars: int = 1200, start: int = 1) -> str:
    """ToolOrchestra's document list: 'Doc i: <contents cut to max_doc_chars> ...' separated by blank lines."""
    return "\n\n".join(
        f"Doc {start + i}: {p.contents[:max_doc_chars]}{' ...' if len(p.contents) > max_doc_chars else ''}"
        for i, p in enumerate(passages)
    )


def make_search_tool(
    retriever: Retriever,
    *,
    name: str = "search",
    topk: int = 5,
    max_doc_chars: int = 1200,
    description: str = "Search the document collection with a short keyword query; returns the top passages.",
) -> Tool:
    """A tool `name(query=<text>)` where the policy writes the query itself (no query-writer model)."""
    kind = getattr(retriever, "kind", "local")

    async def execute(arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        query = arguments["query"].strip()
        if not query:
            return error_result(f"{name}: the query is empty")
        try:
            (hits,) = await retriever.retrieve([query[:1000]], topk)
        except RetrievalError as e:
            return error_result(str(e))
        cost = context.prices.cost(search_queries=1, search_kind=kind)
        observation = (
            format_documents(hits, max_doc_chars) if hits else f"No documents match {query[:100]!r}."
        )
        return ToolResult(
            observation=observation,
            cost_usd=cost,
            search_queries=1,
            documents=tuple(p.contents for p in hits),
        )

    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "A few keywords or a short question."}},
        "required": ["query"],
    }
    return Tool(name=name, description=description, parameters=parameters, execute=execute)
