"""Task JSONL: round trip and one-line file:line errors."""

import json
import random
import string

import pytest

from orchestra_jax.data.tasks import TaskFileError, TaskRecord, domain_dir, load_tasks, write_tasks


def random_task(rng: random.Random, i: int) -> TaskRecord:
    text = "".join(rng.choice(string.ascii_letters + " é") for _ in range(rng.randint(5, 40)))
    return TaskRecord(f"t{i}", text + "?", rng.choice([None, "42"]), ("search", "answer")[: rng.randint(0, 2)],
                      rng.choice([None, [0.1, 0.9]]), {"n": rng.random()})


def test_round_trip(tmp_path):
    rng = random.Random()
    tasks = [random_task(rng, i) for i in range(rng.randint(1, 20))]
    write_tasks(tmp_path / "t.jsonl", tasks)
    assert load_tasks(tmp_path / "t.jsonl") == tasks


@pytest.mark.parametrize("line,message", [
    ("{not json", "invalid JSON"),
    ('{"id": "a"}', "field 'question'"),
    ('{"id": "a", "question": "q", "answer": 3}', "field 'answer'"),
    ('{"id": "a", "question": "q", "tools": "search"}', "field 'tools'"),
    ('{"id": "a", "question": "q", "colour": 1}', "unknown field"),
    ('[1, 2]', "expected a JSON object"),
])
def test_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "ok", "question": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(TaskFileError, match=rf"bad.jsonl:3: .*{message}") as e:
        load_tasks(path)
    assert "\n" not in str(e.value)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "question": "q"}\n{"id": "a", "question": "r"}\n')
    with pytest.raises(TaskFileError, match="dup.jsonl:2: duplicate id 'a' \\(first on line 1\\)"):
        load_tasks(path)
    with pytest.raises(TaskFileError, match="no such task file"):
        load_tasks(tmp_path / "missing.jsonl")


def test_domain_dir_resolves_against_the_file(tmp_path):
    task = TaskRecord("a", "q", metadata={"domain_dir": "bank"})
    assert domain_dir(task, tmp_path / "tasks.jsonl") == (tmp_path / "bank").resolve()
    with pytest.raises(TaskFileError, match="domain_dir"):
        domain_dir(TaskRecord("b", "q"), tmp_path / "tasks.jsonl")
