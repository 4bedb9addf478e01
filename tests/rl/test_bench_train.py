"""`orchestra-jax bench train` end to end on a tiny shape: both steps run and the printed figures agree."""

import dataclasses
import json

import numpy as np
import pytest

from orchestra_jax.rl import bench_torch, bench_train


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_train_reports_flops_and_the_ceiling_bound(capsys, dtype):
    args = bench_train.TrainBenchArgs(models=("qwen3-tiny",), batch=2, seq_len=16, repeats=1, min_seconds=0.0,
                                      compute_dtype=dtype, rounds=2, warmup=1)
    assert bench_train.run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = summary["results"]
    assert summary["compute_dtype"] == row["compute_dtype"] == dtype
    ceiling = summary["gemm_ceiling_gflops"]
    assert row["model"] == "qwen3-tiny" and row["rounds"] == 2 and row["warmup"] == 1
    assert row["jax_tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0 and ceiling["jax"] > 0
    assert len(row["round_speedups"]) == 2 and min(row["round_speedups"]) > 0
    speed_ratio = row["jax_tokens_per_s"] / row["torch_tokens_per_s"]
    assert row["speedup"] == pytest.approx(speed_ratio, abs=0.01)
    # Both steps do the same FLOPs, so their FLOP/s stand in the ratio of their speeds.
    assert row["jax_model_gflops"] / row["torch_model_gflops"] == pytest.approx(speed_ratio, rel=0.02)
    assert row["speedup_bound_at_jax_ceiling"] == pytest.approx(ceiling["jax"] / row["torch_model_gflops"], rel=0.02)


def test_bench_train_rejects_bad_counts():
    for bad in (dict(rounds=0), dict(warmup=-1), dict(seq_len=1), dict(min_seconds=-1.0)):
        with pytest.raises(ValueError, match="must be positive"):
            bench_train.check_args(dataclasses.replace(bench_train.TrainBenchArgs(), **bad))


def test_torch_worker_reports_a_bad_model_dir_in_one_line(tmp_path):
    with pytest.raises(RuntimeError, match=r"PyTorch worker failed: \w+Error") as info:
        bench_torch.TorchReference(str(tmp_path / "missing"), np.zeros((1, 4), np.int64), "float32")
    assert "\n" not in str(info.value)
