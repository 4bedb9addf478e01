"""End-to-end: the `orchestra-jax` CLI run as a user runs it (subprocesses), on the test-tiny preset."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REQUIRED_SCALARS = [
    "reward/mean", "reward/std", "rollout/accuracy", "rollout/cost_usd", "rollout/tool_latency_s",
    "tools/python_calls_per_episode", "tools/search_calls_per_episode", "tools/expert_calls_per_episode",
    "tools/answer_calls_per_episode", "train/kl", "train/entropy", "train/clip_fraction", "train/clip_low",
    "train/clip_high", "train/grad_norm", "optim/lr", "train/tokens_per_s", "time/rollout_s", "time/tools_s",
    "time/logprob_s", "time/update_s", "time/sync_s", "time/checkpoint_s",
]


def cli_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device: the subprocess runs faster than on 8 fake ones
    env["JAX_PLATFORMS"] = "cpu"
    return env


def cli(*args, timeout=900, check=False):
    result = subprocess.run([sys.executable, "-m", "orchestra_jax", *args], capture_output=True, text=True,
                            timeout=timeout, env=cli_env())
    if check and result.returncode != 0:
        raise AssertionError(f"orchestra-jax {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def digest(run_dir):
    out = cli("inspect", "checkpoint", str(run_dir), check=True).stdout
    return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}


# ------------------------------------------------------------------------------------------------ fast


def test_dry_run_prints_plan_mesh_and_estimate_without_weights():
    out = cli("train", "--preset", "orchestrator-8b", "--dry-run", check=True).stdout
    assert "plan for 'orchestrator-8b'" in out and "16 prompts x 8" in out
    assert "weights: a random init ('Qwen/Qwen3-8B' names a preset here" in out  # no such directory here
    estimate = json.loads(out[out.index("{"):])
    assert estimate["model"]["params"] > 8e9 and estimate["mesh"]["fsdp"] >= 1
    assert 10 < estimate["memory_gib_per_device"]["total"] < 80


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--optimizer.lr", "-1"], "optimizer.lr"),
        (["train", "--preset", "nope"], "unknown preset"),
        (["inspect", "checkpoint", "/definitely/not/here"], "no such checkpoint directory"),
        (["inspect"], "usage"),
        (["sft", "--preset", "test-tiny"], "--data"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "straight"
    cli("train", "--preset", "test-tiny", "--steps", "3", "--run-dir", str(run), check=True)
    return run


@pytest.mark.slow
def test_test_tiny_logs_everything(uninterrupted):
    from orchestra_jax.runlog import read_scalars

    scalars = read_scalars(uninterrupted / "tb")
    missing = [tag for tag in REQUIRED_SCALARS if tag not in scalars]
    assert not missing, f"missing scalars: {missing}"
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2, 3]
    rows = [json.loads(line) for line in (uninterrupted / "trajectories" / "step_3.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and all("reward" in r and r["samples"] for r in rows)
    info = digest(uninterrupted)
    assert info["step"] == "3" and int(info["parameters"]) > 1000 and len(info["sha256"]) == 64


def wait_for(path: Path, proc, timeout=900):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()[-3000:]}"
        assert time.time() - start < timeout
        time.sleep(0.5)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    args = ["train", "--preset", "test-tiny", "--steps", "3", "--run-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "orchestra_jax", *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run / "ckpt" / "1", proc)
    time.sleep(random.uniform(0.0, 20.0))  # somewhere in step 2 or 3: rollouts, update or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli(*args, "--resume", check=True)
    assert digest(run) == {**digest(uninterrupted), "checkpoint": str(run / "ckpt")}
    final = (run / "trajectories" / "step_3.jsonl").read_text()
    assert final == (uninterrupted / "trajectories" / "step_3.jsonl").read_text() or _same_tokens(
        final, (uninterrupted / "trajectories" / "step_3.jsonl").read_text()
    )


def _same_tokens(a: str, b: str) -> bool:
    rows_a = [json.loads(x)["samples"] for x in a.splitlines()]
    rows_b = [json.loads(x)["samples"] for x in b.splitlines()]
    return [[s["token_ids"] for s in r] for r in rows_a] == [[s["token_ids"] for s in r] for r in rows_b]


@pytest.mark.slow
def test_sigterm_saves_then_exits_and_resume_matches(uninterrupted, tmp_path):
    run = tmp_path / "terminated"
    args = ["train", "--preset", "test-tiny", "--steps", "3", "--run-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "orchestra_jax", *args], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run / "trajectories" / "step_1.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 143
    saved = digest(run)
    logged = max(int(p.stem.split("_")[1]) for p in (run / "trajectories").glob("step_*.jsonl"))
    assert int(saved["step"]) == logged and logged < 3
    cli(*args, "--resume", check=True)
    assert digest(run)["sha256"] == digest(uninterrupted)["sha256"]


def test_epochs_and_mini_batches_make_several_updates_per_step(tmp_path):
    from orchestra_jax.runlog import read_scalars

    run = tmp_path / "updates"
    out = cli("train", "--preset", "test-tiny", "--steps", "1", "--algorithm.mini-batches", "2", "--algorithm.epochs",
              "2", "--run-dir", str(run), check=True).stdout
    assert read_scalars(run / "tb")["train/updates"] == [(1, 4.0)]
    # The console's last line says where the run is and how it ended (test-tiny has no progress bar).
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"done: step 1 in {run}; last step: accuracy ") and "inspect curves" in last


@pytest.mark.slow
def test_sft_command_trains_on_demonstrations(tmp_path):
    from orchestra_jax.rl.sft import load_demonstrations

    rng = random.Random()
    rows = []
    for _ in range(6):
        ids = [rng.randrange(1, 200) for _ in range(rng.randrange(8, 30))]
        rows.append({"token_ids": ids, "loss_mask": [0] * 4 + [1] * (len(ids) - 4)})
    data = tmp_path / "demos.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_demonstrations(data)) == 6
    run = tmp_path / "sft"
    out = cli("sft", "--data", str(data), "--preset", "test-tiny", "--steps", "12", "--algorithm.sft-lr", "0.01",
              "--run-dir", str(run), check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["last_nll"] < summary["first_nll"]
    assert digest(run)["step"] == "12"
