"""The console script: every listed subcommand has working --help; errors are one line."""

import subprocess
import sys

import pytest

from orchestra_jax import cli


def test_top_level_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name}" in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        status = cli.main([name, "--help"])
        raise SystemExit(status)
    assert info.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_subcommand_is_one_line(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'frobnicate'" in err and err.count("\n") == 1


def test_console_script_reports_bad_flag_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra_jax", "config", "--optimizer.lr", "abc"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "--optimizer.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_dry_run_checks_data_prints_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import json
    import random

    from orchestra_jax.rl import commands

    def no_params(*args, **kwargs):
        raise AssertionError("a dry run initialised params")

    monkeypatch.setattr(commands, "init_params", no_params)
    monkeypatch.chdir(tmp_path)
    rng = random.Random()
    lengths = [rng.randrange(5, 20) for _ in range(rng.randrange(2, 6))]
    data = tmp_path / "demos.jsonl"
    data.write_text("\n".join(json.dumps({"token_ids": [7] * n, "loss_mask": [0, 0] + [1] * (n - 2)})
                               for n in lengths))
    argv = ["sft", "--data", str(data), "--preset", "test-tiny", "--steps", "9", "--algorithm.sft-lr", "0.02"]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 steps" in out and "lr 0.02" in out and "qwen3-tiny" in out
    assert f"{data} ({len(lengths)} samples, {sum(lengths)} tokens)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.jsonl"]  # no runs/ directory

    data.write_text('{"token_ids": [1, 2, 3], "loss_mask": [0, 1]}')
    assert cli.main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1:" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.jsonl"]


def test_ctrl_c_ends_a_command_with_one_line(capsys, monkeypatch):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "config", ("prints the config", interrupted))
    assert cli.main(["config"]) == 130
    err = capsys.readouterr().err
    assert err == "orchestra-jax config: interrupted\n"
