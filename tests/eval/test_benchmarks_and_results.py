"""Benchmark loaders over the shared reference data; resumable results; summary numbers recomputed by hand."""

import dataclasses
import json
import random

import pytest
from PIL import Image

from orchestra_jax.eval import benchmarks as B
from orchestra_jax.eval import plots
from orchestra_jax.eval.results import ExampleResult, ResultsFile, summarize, wilson_interval, write_summary


def test_frames_and_hle_load(shared_data):
    frames = B.load_frames(shared_data / "frames" / "frames.jsonl")
    assert len(frames) == 824 and frames[0].id == "wiki____0" and frames[0].answer == "Jane Ballou"
    hle = B.load_hle(shared_data / "hle" / "hle_20.jsonl") + B.load_hle(shared_data / "hle" / "hle_smoke_10.jsonl")
    assert len(hle) == 30 and len({e.id for e in hle}) == 30
    assert all(e.metadata["answer_type"] in ("exactMatch", "multipleChoice") for e in hle)


def test_multihop_questions_and_corpora(shared_data):
    hotpot = B.load_multihop(shared_data / "multihop" / "hotpotqa_train.json")
    musique = B.load_multihop(shared_data / "multihop" / "musique_train.json")
    assert len(hotpot) == len(musique) == 100
    assert any(e.aliases for e in musique)
    assert len(B.load_multihop_corpus(shared_data / "multihop" / "hotpotqa_train_corpus.json")) == 994
    assert len(B.load_multihop_corpus(shared_data / "multihop" / "musique_train_corpus.json")) == 1890


def test_malformed_lines_are_named_and_skipped_or_fatal(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"id": "a", "question": "q1", "answer": "x"}\n{oops\n{"id": "c", "question": "", "answer": "y"}\n')
    skipped = []
    examples = B.load_frames(path, on_skip=skipped.append)
    assert [e.id for e in examples] == ["a"]
    assert skipped[0].startswith(f"{path}:2: malformed line") and f"{path}:3" in skipped[1]
    with pytest.raises(B.BenchmarkError, match=r"bench\.jsonl:2: malformed line"):
        B.load_frames(path, strict=True)
    with pytest.raises(B.BenchmarkError, match="benchmark file not found"):
        B.load_hle(tmp_path / "missing.jsonl")


def _random_results(rng, n):
    tools = ["search", "python", "answer"]
    return [
        ExampleResult(
            id=f"ex{i}",
            correct=rng.random() < 0.6,
            cost_usd=rng.random() / 100,
            latency_s=rng.random() * 5,
            turns=rng.randint(1, 5),
            tool_calls={t: rng.randint(0, 2) for t in rng.sample(tools, 2)},
            status="error" if rng.random() < 0.1 else "ok",
            judge_cost_usd=rng.random() / 1000,
        )
        for i in range(n)
    ]


def test_summary_matches_hand_computation():
    rng = random.Random()
    rows = _random_results(rng, 40)
    s = summarize(rows)
    ok = [r for r in rows if r.status == "ok"]
    assert s["scored"] == len(ok) and s["errors"] == 40 - len(ok)
    assert s["accuracy"] == pytest.approx(sum(r.correct for r in ok) / len(ok))
    assert s["cost_usd_total"] == pytest.approx(sum(r.cost_usd for r in ok))
    assert s["cost_usd_mean"] == pytest.approx(sum(r.cost_usd for r in ok) / len(ok))
    assert s["latency_s_mean"] == pytest.approx(sum(r.latency_s for r in ok) / len(ok))
    search_calls = sum(r.tool_calls.get("search", 0) for r in ok)
    all_calls = sum(sum(r.tool_calls.values()) for r in ok)
    assert s["tool_share"].get("search", 0) == pytest.approx(search_calls / all_calls)
    low, high = s["accuracy_ci95"]
    assert low <= s["accuracy"] <= high


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    for n in range(1, 60):  # the interval holds the observed proportion, all-right and all-wrong included
        for k in (0, n // 2, n):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0


def test_plots_take_perfect_and_zero_accuracy(tmp_path):
    rows = [ExampleResult(id=f"e{i}", correct=True, cost_usd=0.01, latency_s=1.0, turns=1) for i in range(10)]
    wrong = [dataclasses.replace(r, correct=False) for r in rows]
    summaries = {"all right": summarize(rows), "all wrong": summarize(wrong)}
    plots.plot_pareto(summaries, tmp_path / "pareto.png")
    plots.plot_turn_sweep({1: summaries["all wrong"], 2: summaries["all right"]}, tmp_path / "turns.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "turns.png").stat().st_size > 0


def test_results_file_resumes_after_torn_write(tmp_path):
    rng = random.Random()
    store = ResultsFile(tmp_path / "results.jsonl")
    rows = [r for r in _random_results(rng, 5)]
    for r in rows[:3]:
        store.append(r)
    with store.path.open("a") as f:  # a run killed mid-write
        f.write('{"id": "ex3", "corr')
    assert {r.id for r in store.read()} == {r.id for r in rows[:3]}
    store.append(rows[4])
    assert [r.id for r in store.read()] == [r.id for r in rows[:3]] + ["ex4"]
    assert store.done_ids() == {r.id for r in rows[:3] + rows[4:] if r.status == "ok"}


def test_summary_files_and_plots(tmp_path):
    rng = random.Random()
    summaries = {f"p{i}": summarize(_random_results(rng, 20)) for i in range(3)}
    write_summary(tmp_path, summaries)
    assert json.loads((tmp_path / "summary.json").read_text()).keys() == summaries.keys()
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + 3
    pareto = plots.plot_pareto(summaries, tmp_path / "pareto.png")
    sweep = plots.plot_turn_sweep({t: s for t, s in zip((10, 20, 50), summaries.values())}, tmp_path / "turns.png")
    for path in (pareto, sweep):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.4), (0.5, 0.2), (3.0, 0.9), (1.0, 0.3)]
    assert plots.pareto_front(points) == [(0.5, 0.2), (1.0, 0.5), (3.0, 0.9)]
