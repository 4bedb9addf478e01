"""The GPU device script: refuses CPU without --interpret; its whole path runs in interpret mode (slow)."""

import json

import pytest
from orchestra_jax.kernels import gpu_bench


def test_gpu_bench_refuses_cpu_in_one_line(capsys):
    assert gpu_bench.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_bench: needs a GPU backend") and "\n" not in err


@pytest.mark.slow
def test_gpu_bench_dry_run_in_interpret_mode(tmp_path, capsys):
    argv = ["--interpret", "--tokens", "32", "--hidden", "32", "--vocab", "300", "--repeats", "1"]
    assert gpu_bench.main(argv + ["--block-t", "16", "--block-k", "16", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert rows[0]["parity_max_rel_err"] < 1e-5 and rows[0]["pallas_fwd_tflops"] > 0
