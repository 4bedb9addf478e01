"""`orchestra-jax bench logprob` as a user runs it, on tiny shapes."""

import json

from orchestra_jax import cli


def test_bench_logprob_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["bench", "logprob", "--tokens", "32", "--hidden", "16", "--vocab", "700", "--repeats", "1"]
    assert cli.main(argv + ["--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "naive GiB" in printed and "fwd+bwd" in printed
    rows = json.loads(out.read_text())
    assert [(r["tokens"], r["pass"]) for r in rows] == [(32, "fwd"), (32, "fwd+bwd")]
    for r in rows:
        assert r["naive_peak_bytes"] > 0 and r["fused_s"] > 0
        assert abs(r["memory_ratio"] - r["fused_peak_bytes"] / r["naive_peak_bytes"]) < 1e-12
    assert json.loads(printed.strip().splitlines()[-1]) == rows


def test_bench_memory_only_and_bad_flags(capsys):
    assert (
        cli.main(["bench", "logprob", "--tokens", "16", "--hidden", "8", "--vocab", "300", "--no-time-runs"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(r["naive_s"] is None and r["memory_ratio"] > 0 for r in rows)
    assert cli.main(["bench", "logprob", "--passes", "sideways"]) == 2
    assert "--passes" in capsys.readouterr().err
