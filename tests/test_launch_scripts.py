"""launch/profile_step.py, gpu_train_bench.py's --override and compare_code.py, on the CPU with the tiny model."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar_of_this_tree(path: pathlib.Path) -> pathlib.Path:
    """A compare_code.py BASE: this tree's orchestra_jax/ and kernels/."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name in ("orchestra_jax", "kernels"):
            tar.add(LAUNCH.parent / name, arcname=name,
                    filter=lambda info: None if "__pycache__" in info.name else info)
    return path


def test_profile_step_accounts_the_step_by_kind_and_loop_and_rereads_it(tmp_path):
    out = tmp_path / "prof"
    flags = ["--model", "qwen3-tiny", "--batch", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1"]
    run = subprocess.run([sys.executable, str(LAUNCH / "profile_step.py"), *flags, "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["busy_ms"] > 0 and summary["kinds_ms"]["matmul"] > 0
    assert abs(sum(summary["kinds_ms"].values()) - summary["busy_ms"]) < 0.05
    layer_loops = [loop for loop, source in summary["loop_sources"].items() if source.startswith("hidden_states")]
    assert {loop.endswith("x2") for loop in layer_loops} == {True}  # two layers: the scan runs twice
    assert any(summary["loop_sources"][loop].endswith("backward") for loop in layer_loops)
    assert "kind" in run.stdout and "loop (outermost first)" in run.stdout
    # The matmuls do at least the model's useful work (remat full recomputes the forward's on top of it).
    from orchestra_jax.models.transformer_config import get_preset
    assert summary["matmul_gflop"] >= get_preset("qwen3-tiny").train_flops_per_token(32) * 2 * 32 / 1e9
    assert any(r["tflops"] for r in summary["top_ops"] if r["kind"] == "matmul")
    traced_span = sum(summary["ops_at_once_ms"].values())
    assert summary["busy_ms"] * 0.99 <= sum(int(k.split()[0]) * v for k, v in summary["ops_at_once_ms"].items())
    assert traced_span <= summary["wall_ms"] * 1.01

    again = subprocess.run([sys.executable, str(LAUNCH / "profile_step.py"), "--from", str(out)],
                           capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"ops busy {summary['busy_ms']:.1f} ms" in again.stdout


def test_dot_flops_reads_dots_fusions_and_cublas_calls_and_concurrency_splits_the_wall():
    profile = _module("profile_step")
    hlo = """HloModule m
%fused_computation (param_0: bf16[8,3,192,64], param_1: bf16[8,3,64,256]) -> f32[8,3,192,256] {
  %param_0 = bf16[8,3,192,64]{3,2,1,0} parameter(0)
  %param_1 = bf16[8,3,64,256]{3,2,1,0} parameter(1)
  ROOT %dot.1 = f32[8,3,192,256]{3,2,1,0} dot(%param_0, %param_1), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}
}
ENTRY %main (a: bf16[8,3,192,64], b: bf16[8,3,64,256], w: bf16[2048,576]) -> f32[1] {
  %a = bf16[8,3,192,64]{3,2,1,0} parameter(0)
  %b = bf16[8,3,64,256]{3,2,1,0} parameter(1)
  %w = bf16[2048,576]{1,0} parameter(2)
  %fusion.7 = f32[8,3,192,256]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation
  %custom-call.2 = (f32[576,576]{1,0}, s8[1024]{0}) custom-call(%w, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["0"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
}
"""
    computations, instructions, _ = profile.parse_hlo(hlo)
    assert profile.dot_flops("fusion.7", computations, instructions) == 2 * 8 * 3 * 192 * 256 * 64
    assert profile.dot_flops("custom-call.2", computations, instructions) == 2 * 576 * 576 * 2048
    assert profile.dot_flops("a", computations, instructions) == 0

    # Two threads: a matmul alone 0-4 ms, beside an add 4-6 ms, nothing 6-7 ms, the add alone 7-9 ms.
    spans = [(0, 6_000_000, "mm"), (4_000_000, 6_000_000, "add"), (7_000_000, 9_000_000, "add")]
    at_once = profile.concurrency(spans, {"mm": "matmul", "add": "elementwise"}, steps=1)
    assert at_once == {"0": 1.0, "1 (matmul)": 4.0, "1 (other)": 2.0, "2 (matmul)": 2.0}


def test_profile_step_from_a_missing_folder_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(LAUNCH / "profile_step.py"), "--from", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("--from") and len(run.stderr.strip().splitlines()) == 1


def test_override_sets_a_module_constant_and_names_a_missing_one(monkeypatch):
    bench = _module("gpu_train_bench")
    from orchestra_jax.kernels import logprob_reference

    monkeypatch.setattr(logprob_reference, "CHUNK_ELEMENTS", logprob_reference.CHUNK_ELEMENTS)
    bench.apply_overrides(["orchestra_jax.kernels.logprob_reference.CHUNK_ELEMENTS=4096"])
    assert logprob_reference.CHUNK_ELEMENTS == 4096
    with pytest.raises(SystemExit, match="has no constant NOPE"):
        bench.apply_overrides(["orchestra_jax.kernels.logprob_reference.NOPE=1"])
    with pytest.raises(SystemExit, match="--override 'orchestra_jax.kernels.logprob_reference.CHUNK_ELEMENTS=x"):
        bench.apply_overrides(["orchestra_jax.kernels.logprob_reference.CHUNK_ELEMENTS=x+"])


def test_versus_builds_a_second_step_under_its_overrides_times_both_and_restores_them(monkeypatch, capsys):
    bench = _module("gpu_train_bench")
    from orchestra_jax.models import transformer

    blocks_at_build = []
    real_build = bench.build

    def spy(name, args):
        blocks_at_build.append(transformer.CPU_CAUSAL_BLOCK)
        return real_build(name, args)

    monkeypatch.setattr(bench, "build", spy)
    before = transformer.CPU_CAUSAL_BLOCK
    bench.main(["--models", "qwen3-tiny", "--batch", "2", "--seq-len", "64", "--steps", "4", "--matmul-n", "128",
                "--versus", f"orchestra_jax.models.transformer.CPU_CAUSAL_BLOCK={before // 4}"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert blocks_at_build == [before, before // 4] and transformer.CPU_CAUSAL_BLOCK == before
    assert row["versus_step_s"] > 0 and row["versus_speedup"] > 0 and row["versus_loss_finite"]
    assert row["kernel_s_per_step"] >= 0 and row["page_faults_per_step"] >= 0
    assert row["mfu_dense_attention_vs_measured_ceiling"] >= row["mfu_vs_measured_ceiling"] > 0
    assert row["versus_kernel_s_per_step"] >= 0 and row["versus_page_faults_per_step"] >= 0
    assert row["versus"] == [f"orchestra_jax.models.transformer.CPU_CAUSAL_BLOCK={before // 4}"]


def test_bench_rows_hold_the_asked_number_of_packed_samples():
    bench = _module("gpu_train_bench")
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_step_args(parser)
    args = parser.parse_args(["--batch", "2", "--seq-len", "64", "--samples-per-row", "4"])
    model, _, _, batch = bench.build("qwen3-tiny", args)
    assert batch["segment_ids"].shape == (1, 2, 64)
    assert [sorted(set(row.tolist())) for row in batch["segment_ids"][0]] == [[1, 2, 3, 4]] * 2
    assert bench.trained_tokens(args) == int(batch["mask"].sum()) == 2 * 4 * 15
    assert bench.model_flops_per_step(model, args) == model.train_flops_per_token(16) * 120
    assert bench.model_flops_per_step(model, args, causal=False) == model.train_flops_per_token(16, causal=False) * 120


def test_compare_code_times_two_codes_in_turn_and_names_a_bad_base(tmp_path):
    """This tree against a tar of itself: one round, each code in its own process."""
    base = _tar_of_this_tree(tmp_path / "base.tar")
    flags = ["--models", "qwen3-tiny", "--batch", "2", "--seq-len", "32", "--steps", "1", "--matmul-n", "128"]
    run = subprocess.run([sys.executable, str(LAUNCH / "compare_code.py"), str(base), "--rounds", "1", "--", *flags],
                         capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["round"], r["code"]) for r in rows[:2]] == [(1, "base"), (1, "this")]
    assert all(r["step_s"]["qwen3-tiny"] > 0 for r in rows[:2])
    assert rows[2]["speedup_median"]["qwen3-tiny"] == round(
        rows[0]["step_s"]["qwen3-tiny"] / rows[1]["step_s"]["qwen3-tiny"], 3)

    bad = subprocess.run([sys.executable, str(LAUNCH / "compare_code.py"), "no-such-rev"],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("BASE 'no-such-rev'") and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_gpu_session_script_runs_every_stage_on_the_cpu_in_smoke_mode(tmp_path):
    """SMOKE=1: the lent-device script end to end on the tiny model, so an error in it costs no device time.
    Without a GPU its cuDNN tests fail and the timings fall back to the XLA attention."""
    import tarfile

    root = LAUNCH.parent
    base = _tar_of_this_tree(tmp_path / "base.tar")
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "GPU_SESSION_WORK": str(tmp_path / "work"), "BASE_TAR": str(base),
           "XLA_FLAGS": ""}
    run = subprocess.run(["bash", str(LAUNCH / "gpu_session.sh"), "900", str(out)], cwd=root, capture_output=True,
                         text=True, timeout=1200, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = (out / "summary.log").read_text()
    stages = ["train_06", "train_17", "profile_06", "four_per_row", "compare_base", "train_06_full", "long_rows_xla"]
    assert "== attention for the timings: --attention xla" in summary
    for stage in stages:
        assert f"== {stage}: exit 0" in summary, summary
    with tarfile.open(out / "gpu_session.tgz") as tar:
        names = set(tar.getnames())
    assert {f"./{stage}.log" for stage in stages} <= names and "./profile_06/summary.json" in names
    pair = json.loads((tmp_path / "work" / "gpu_session_logs" / "train_06.log").read_text().splitlines()[-1])
    assert pair["remat"] == "dots" and pair["versus_step_s"] > 0
