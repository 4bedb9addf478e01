"""`orchestra-jax bench train` end to end on a tiny shape: both steps run and the printed figures agree."""

import json

import pytest

from orchestra_jax.rl import bench_train


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_train_reports_flops_and_the_ceiling_bound(capsys, dtype):
    args = bench_train.TrainBenchArgs(models=("qwen3-tiny",), batch=2, seq_len=16, repeats=1, min_seconds=0.0,
                                      compute_dtype=dtype, rounds=2)
    assert bench_train.run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = summary["results"]
    assert summary["compute_dtype"] == row["compute_dtype"] == dtype
    ceiling = summary["gemm_ceiling_gflops"]
    assert row["model"] == "qwen3-tiny" and row["rounds"] == 2
    assert row["jax_tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0 and ceiling["jax"] > 0
    assert len(row["round_speedups"]) == 2 and min(row["round_speedups"]) > 0
    speed_ratio = row["jax_tokens_per_s"] / row["torch_tokens_per_s"]
    assert row["speedup"] == pytest.approx(speed_ratio, abs=0.01)
    # Both steps do the same FLOPs, so their FLOP/s stand in the ratio of their speeds.
    assert row["jax_model_gflops"] / row["torch_model_gflops"] == pytest.approx(speed_ratio, rel=0.02)
    assert row["speedup_bound_at_jax_ceiling"] == pytest.approx(ceiling["jax"] / row["torch_model_gflops"], rel=0.02)
