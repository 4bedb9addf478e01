import asyncio
import json
import random
import socket

import httpx
import pytest

from orchestra_jax.env.catalog import ToolCatalog, ToolContext
from orchestra_jax.env.prices import default_price_table
from orchestra_jax.env.search import (
    BackgroundServer,
    BM25Index,
    CorpusError,
    HttpRetriever,
    LocalRetriever,
    Passage,
    RetrievalError,
    load_corpus,
    make_search_tool,
    open_bm25,
    retrieval_app,
)


@pytest.fixture(scope="module")
def hotpot(shared_data):
    corpus = shared_data / "multihop" / "hotpotqa_train_corpus.json"
    questions = json.loads((shared_data / "multihop" / "hotpotqa_train.json").read_text())
    return corpus, questions


@pytest.fixture(scope="module")
def hotpot_index(hotpot, tmp_path_factory):
    return open_bm25(hotpot[0], cache_dir=tmp_path_factory.mktemp("bm25"))


def _recall(index, questions, gold_titles, k):
    results = index.search([q for q in questions], k)
    hits = sum(len(gold & {p.title for p in got}) for gold, got in zip(gold_titles, results, strict=True))
    return hits / sum(len(g) for g in gold_titles)


def test_recall_at_k_hotpotqa(hotpot, hotpot_index):
    _, questions = hotpot
    gold = [{title for title, _ in q["supporting_facts"]} for q in questions]
    text = [q["question"] for q in questions]
    assert len(hotpot_index.passages) == 994
    r2, r5, r20 = (_recall(hotpot_index, text, gold, k) for k in (2, 5, 20))
    assert r2 <= r5 <= r20
    assert r5 >= 0.65 and r20 >= 0.85


def test_recall_at_k_musique(shared_data, tmp_path):
    questions = json.loads((shared_data / "multihop" / "musique_train.json").read_text())
    index = open_bm25(shared_data / "multihop" / "musique_train_corpus.json", cache_dir=tmp_path)
    gold = [{p["title"] for p in q["paragraphs"] if p["is_supporting"]} for q in questions]
    assert _recall(index, [q["question"] for q in questions], gold, 10) >= 0.45


def test_index_is_cached_by_corpus_hash(tmp_path):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    docs = [
        {"id": f"d{i}", "title": f"T{i}", "text": " ".join(random.choices(words, k=12)) + f" tag{i}"}
        for i in range(30)
    ]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in docs))
    cache = tmp_path / "cache"
    first = open_bm25(corpus, cache_dir=cache)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "passages.jsonl").is_file()
    second = open_bm25(corpus, cache_dir=cache)
    assert (
        [p.id for p in second.search(["tag7"], 3)[0]]
        == [p.id for p in first.search(["tag7"], 3)[0]]
        == ["d7"]
    )
    corpus.write_text(corpus.read_text() + "\n" + json.dumps({"id": "new", "text": "zulu"}))
    assert open_bm25(corpus, cache_dir=cache).search(["zulu"], 2)[0][0].id == "new"
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"text": "ok"}\n{broken', "a.jsonl:2: invalid JSON"),
        ("b.json", '[{"title": "x"}]', "item 0: no string field"),
        ("c.json", "42", "expected a list of passages"),
        ("d.json", "[]", "no passages"),
        ("e.json", '{"T": 5}', "entry 'T' must be a string"),
    ],
)
def test_bad_corpus_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(path)


def test_corpus_shapes(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"Paris": ["Capital ", "of France."]}))
    (tmp_path / "b.json").write_text(json.dumps([{"id": 7, "contents": '"Rome"\nCapital of Italy.'}]))
    assert load_corpus(tmp_path / "a.json") == [Passage("0", "Paris", "Capital of France.")]
    assert load_corpus(tmp_path / "b.json") == [Passage("7", "Rome", "Capital of Italy.")]


def test_http_retrieval_matches_local(hotpot_index):
    queries = [
        q.question if hasattr(q, "question") else q
        for q in ["Which magazine was started first?", "Who directed the film Gravity?"]
    ]
    topk = random.randint(2, 8)
    local = asyncio.run(LocalRetriever(hotpot_index).retrieve(queries, topk))
    with BackgroundServer(retrieval_app(hotpot_index, max_topk=50)) as server:
        remote = asyncio.run(HttpRetriever(server.url).retrieve(queries, topk))
        raw = httpx.post(server.url + "/retrieve", json={"queries": queries[:1], "topk": 2}).json()
        too_many = httpx.post(server.url + "/retrieve", json={"queries": queries, "topk": 51})
        with pytest.raises(RetrievalError, match="answered HTTP 422"):
            asyncio.run(HttpRetriever(server.url, retries=3).retrieve(queries, 51))
        bad = httpx.post(server.url + "/retrieve", json={"queries": "not a list", "topk": 2})
    assert [[p.id for p in hits] for hits in remote] == [[p.id for p in hits] for hits in local]
    assert remote[0][0].score == pytest.approx(local[0][0].score, rel=1e-5)
    assert remote[0][0].contents == local[0][0].contents
    assert len(raw) == 1 and len(raw[0]) == 2 and set(raw[0][0]) == {"document"}
    assert too_many.status_code == 422 and bad.status_code == 422


def test_unreachable_server_is_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RetrievalError, match="unreachable after 2 tries"):
        asyncio.run(HttpRetriever(f"http://127.0.0.1:{port}", retries=1, timeout_s=2).retrieve(["x"], 1))


def test_search_tool_through_catalog(hotpot_index):
    catalog = ToolCatalog((make_search_tool(LocalRetriever(hotpot_index), topk=3, max_doc_chars=50),))
    prices = default_price_table()
    result = asyncio.run(
        catalog.execute("search", {"query": "Gravity film director"}, ToolContext(prices=prices))
    )
    assert result.error is None and len(result.documents) == 3
    assert result.observation.startswith("Doc 1: ") and "Doc 3: " in result.observation
    assert result.search_queries == 1 and result.cost_usd == 0.0  # local search has no fee
    empty = asyncio.run(catalog.execute("search", {"query": "  "}))
    assert empty.error == "search: the query is empty"
    wrong = asyncio.run(catalog.execute("search", {"query": 5}))
    assert "must be string" in wrong.error


def test_build_without_cache():
    index = BM25Index.build([Passage("a", "", "red apple"), Passage("b", "", "green pear")])
    assert [p.id for p in index.search(["pear"], 5)[0]] == ["b"]


def test_cli_retrieval_server_rejects_a_bad_corpus(tmp_path, capsys):
    from orchestra_jax import cli

    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": 3, "text": "x"}\n')
    assert cli.main(["retrieval-server", "--corpus", str(bad), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"orchestra-jax retrieval-server: error: {bad}:2: 'title' must be a string"
