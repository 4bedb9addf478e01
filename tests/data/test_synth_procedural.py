"""The full synthesis pipeline with the procedural backend: verified tasks, a report that adds up, outputs that
load, and a scripted policy replaying the gold actions scoring 1.0."""

import json
import random

import pytest

from orchestra_jax.data import tasks as tasks_lib
from orchestra_jax.data.synth import stages, verify
from orchestra_jax.data.synth.procedural import ProceduralBackend
from orchestra_jax.env import domain as dl


def run(domain: str, seed: int, num_tasks: int = 24) -> stages.SynthResult:
    config = stages.SynthConfig(domain, num_tasks=num_tasks, db_rounds=2, records_per_round=4, seed=seed)
    return stages.synthesize(ProceduralBackend.for_domain(domain, seed), config)


def scripted_gold_policy(domain: dl.Domain, task: dl.DomainTask) -> dl.EpisodeScore:
    """Replays the gold actions, then tells the user everything the tools returned."""
    env = dl.DomainEnv(domain, task)
    observations = [env.call(a.name, dict(a.arguments)).observation for a in task.actions]
    return env.score(["Here is what I found: " + " ".join(observations)])


@pytest.mark.parametrize("name", ["bank", "library", "clinic"])
def test_pipeline_emits_only_verified_tasks(tmp_path, name):
    seed = random.randrange(10**6)
    result = run(name, seed)
    report = result.report
    assert report["stopped_at"] is None, report["stopped_at"]
    flt = report["filter"]
    assert flt["adds_up"] and flt["candidates"] == 24
    assert flt["kept"] == len(result.tasks) > 0
    assert flt["kept"] + sum(flt["removed"].values()) == flt["candidates"]
    assert dl.check_database(result.domain.data_model, result.domain.db) == []
    db = report["database"]
    assert db["accepted"] + db["rejected"] == db["proposed"] > 0
    for task_id, draft in result.tasks:
        assert verify.check_task(result.domain, draft).reason is None, task_id

    written = stages.write_outputs(result, tmp_path)
    assert written["outputs"]["tasks"].endswith("tasks.jsonl")
    domain = dl.load_domain(tmp_path / name)
    tau2_tasks = dl.load_domain_tasks(tmp_path / name)
    records = tasks_lib.load_tasks(tmp_path / "tasks.jsonl")
    assert [t.id for t in tau2_tasks] == [r.id for r in records] == [tid for tid, _ in result.tasks]
    assert all(tasks_lib.domain_dir(r, tmp_path / "tasks.jsonl") == (tmp_path / name).resolve() for r in records)
    scores = [scripted_gold_policy(domain, t) for t in tau2_tasks]
    assert all(s.reward == 1.0 for s in scores)
    report_file = json.loads((tmp_path / "report.json").read_text())
    assert report_file["filter"] == flt


def test_doing_nothing_scores_zero_on_write_tasks():
    result = run("bank", random.randrange(10**6))
    writes = [verify.to_domain_task(tid, d) for tid, d in result.tasks if d["expected_changes"]]
    assert writes
    for task in writes:
        env = dl.DomainEnv(result.domain, task)
        assert env.score(["I could not help."]).reward == 0.0


def test_same_seed_same_output_and_evolve_adds_steps():
    seed = random.randrange(10**6)
    a, b = run("library", seed), run("library", seed)
    assert a.tasks == b.tasks and a.domain.db == b.domain.db
    evolved = [d for _, d in a.tasks if d.get("evolved")]
    stats = a.report["evolve"]
    assert 0 < len(evolved) <= stats["accepted"] <= stats["attempted"] <= stats["eligible"]
    assert stats["accepted"] + sum(stats["rejected"].values()) == stats["attempted"]
    assert all(len(d["actions"]) > d["parent_actions"] for d in evolved)


def test_filter_classifies_each_kind_of_bad_draft():
    result = run("clinic", random.randrange(10**6), num_tasks=12)
    domain = result.domain
    good = next(d for _, d in result.tasks if d["expected_changes"])
    unsolvable = {**good, "actions": good["actions"] + [{"name": "get_patient", "arguments": {"patient_id": "PT9999"}}]}
    unknown_tool = {**good, "actions": [{"name": "launch_rocket", "arguments": {}}]}
    lying = {**good, "expected_changes": [{**good["expected_changes"][0], "value": "something else"}]}
    silent = {**good, "expected_changes": []}
    hidden = {**good, "communicate_info": ["a value no tool ever printed"]}
    trivial = {**good, "actions": good["actions"][:1], "expected_changes": [], "communicate_info": []}
    drafts = [("good", good), ("copy", json.loads(json.dumps(good))), ("u", unsolvable), ("m", unknown_tool),
              ("c", lying), ("s", silent), ("h", hidden), ("t", trivial), ("f", None)]
    kept, report = verify.filter_tasks(domain, drafts)
    assert [tid for tid, _ in kept] == ["good"]
    assert report.adds_up and report.candidates == len(drafts)
    assert report.removed == {"generation_failed": 1, "malformed": 1, "unsolvable": 1, "claim_mismatch": 2,
                              "info_unobservable": 1, "trivial": 1, "near_duplicate": 1}


def test_minhash_finds_near_duplicates_only():
    rng = random.Random()
    words = [f"w{rng.randrange(10**6)}" for _ in range(60)]
    base = " ".join(words)
    near = " ".join(words[:-1] + ["changed"])
    other = " ".join(f"z{rng.randrange(10**6)}" for _ in range(60))
    assert verify.near_duplicate_mask([base, near, other], threshold=0.8) == [False, True, False]


def test_unknown_domain_and_bad_names_fail_early():
    with pytest.raises(ValueError, match="procedural backend has no domain 'airline'"):
        ProceduralBackend.for_domain("airline")
    with pytest.raises(ValueError, match="domain name"):
        stages.synthesize(ProceduralBackend.for_domain("bank"), stages.SynthConfig("Bank!"))


def test_jsonl_feeds_the_episode_loop_and_the_catalog_grades(tmp_path):
    """Our JSONL loads as the trainer's episode `Task`s; a scripted policy calling gold actions through the episode
    `ToolCatalog` (async, as the episode loop calls tools) scores 1.0 in the domain environment."""
    import asyncio

    from orchestra_jax.env.trajectory import Task

    result = run("bank", random.randrange(10**6), num_tasks=12)
    stages.write_outputs(result, tmp_path)
    episode_tasks = tasks_lib.load_playable_tasks(tmp_path / "tasks.jsonl")
    assert episode_tasks and all(isinstance(t, Task) for t in episode_tasks)
    domain = dl.load_domain(tmp_path / "bank")

    async def play(task: Task) -> dl.EpisodeScore:
        grading = tasks_lib.domain_task(task)
        env = dl.DomainEnv(domain, grading)
        catalog = env.catalog()
        assert set(catalog.names) == set(task.tools)
        said = [(await catalog.execute(a.name, dict(a.arguments))).observation for a in grading.actions]
        return env.score(said)

    for task in episode_tasks:
        assert asyncio.run(play(task)).reward == 1.0
    with pytest.raises(tasks_lib.TaskFileError, match="not a domain task"):
        tasks_lib.domain_task(tasks_lib.TaskRecord("x", "q"))


def test_difficulty_filter_keeps_tasks_solved_sometimes():
    rng = random.Random()
    rates = {f"t{i}": rng.choice([0.0, 0.25, 0.5, 1.0]) for i in range(20)}
    kept, seen = verify.difficulty_filter(list(rates), rates.__getitem__)
    assert seen == rates and kept == [t for t, r in rates.items() if 0.0 < r < 1.0]
