"""`orchestra-jax synth` as a user runs it."""

import json
import subprocess
import sys

from orchestra_jax import cli
from orchestra_jax.data import tasks as tasks_lib
from orchestra_jax.env import domain as dl


def test_synth_command_writes_a_loadable_domain(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["synth", "--domain", "clinic", "--out", str(out), "--num-tasks", "10", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "tasks:" in printed and "report:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["filter"]["adds_up"] and report["backend"] == "procedural"
    assert len(tasks_lib.load_tasks(out / "tasks.jsonl")) == report["filter"]["kept"] == \
        len(dl.load_domain_tasks(out / "clinic"))
    assert (out / "clinic" / "policy.md").read_text().startswith("# Clinic agent policy")


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "x"
    for argv, message in [
        (["--domain", "airline"], "the procedural backend knows bank, library, clinic"),
        (["--domain", "bank", "--backend", "llm"], "--backend llm needs --llm ENDPOINT"),
        (["--domain", "bank", "--backend", "llm", "--llm", "ftp://host"], "expected an http(s) URL"),
        (["--domain", "bank", "--num-tasks", "0"], "--num-tasks must be at least 1"),
    ]:
        assert cli.main(["synth", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("orchestra-jax synth: error:")
    assert not out.exists()


def test_console_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "orchestra_jax", "synth", "--domain", "library", "--out",
                             str(tmp_path / "o"), "--num-tasks", "6"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "library" / "db.json").exists()
