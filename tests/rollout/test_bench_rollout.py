"""`orchestra-jax bench rollout` as a user runs it, on a tiny model: both engines decode, the table prints."""

import re

from orchestra_jax import cli


def test_bench_rollout_prints_both_rates_and_their_ratio(capsys):
    # 64 decoded tokens, not 16: with 16 the decode phase took so little time that on a busy machine the full run's
    # best time once came out no longer than the first token's, and the rate was NaN (seen in CI, session 10).
    argv = ["bench", "rollout", "--model", "qwen3-tiny", "--batch-sizes", "2", "--prompt-tokens", "4",
            "--new-tokens", "65", "--repeats", "2", "--decode-chunk", "4", "--no-sync-135m"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    [row] = [line.split() for line in printed.splitlines() if re.match(r"\s+2\s", line)]
    jax_rate, ttft, calls, steps, hf_rate, ratio = (float(x.rstrip("x")) for x in row[1:])
    assert jax_rate > 0 and hf_rate > 0 and ttft > 0
    assert abs(ratio - jax_rate / hf_rate) <= 0.01 * ratio + 0.006  # each printed rounded
    assert calls == 16 / 64 and steps == 64 / 64  # 64 decoded tokens in chunks of 4
    assert "prefix reuse" in printed


def test_bench_rollout_bad_flags_are_one_line(capsys):
    assert cli.main(["bench", "rollout", "--batch-sizes", "0"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert cli.main(["bench", "rollout", "--model", "no-such-model"]) == 2
    assert "--model" in capsys.readouterr().err
