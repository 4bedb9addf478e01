"""The train step on two codes, in alternating processes: this tree against a baseline.

    python launch/compare_code.py BASE [--rounds 3] -- [gpu_train_bench.py flags]
    python launch/compare_code.py HEAD~1 -- --models smollm2-135m --batch 8 --seq-len 256 --remat dots --matmul-n 1024

BASE is a git revision (read with `git archive`) or a tar holding `orchestra_jax/` and `kernels/` (for a machine
without the history: `git archive -o base.tar REV orchestra_jax kernels`). Each round runs
`launch/gpu_train_bench.py` once on each code, in a fresh process, the order flipping every round, so the
machine's drift in speed hits both alike; one process right after the other is as close as two codes can be
timed. It prints each run's step seconds and, per model, the median over rounds of base / this (above 1: this
tree is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def package(src: Path, dest: Path) -> Path:
    """The installed layout (kernels/ inside the package) of a source tree, at dest; returns dest."""
    if not (src / "orchestra_jax").is_dir() or not (src / "kernels").is_dir():
        raise SystemExit(f"{src}: no orchestra_jax/ and kernels/ to compare")
    shutil.copytree(src / "orchestra_jax", dest / "orchestra_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(dest / "orchestra_jax" / "kernels", ignore_errors=True)
    shutil.copytree(src / "kernels", dest / "orchestra_jax" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def base_source(base: str, work: Path) -> Path:
    """The baseline's source tree: a tar's contents, or a git revision's archive."""
    src = work / "base_src"
    src.mkdir()
    if Path(base).is_file():
        tar_path = Path(base)
    else:
        tar_path = work / "base.tar"
        done = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar_path), base, "orchestra_jax",
                               "kernels"], capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["git archive failed"])[0]
            raise SystemExit(f"BASE {base!r}: neither a file nor a git revision here ({reason})")
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(src, filter="data")
    except tarfile.TarError as e:
        raise SystemExit(f"BASE {base!r}: not a readable tar ({e})") from None
    return src


def run_bench(pkg: Path, bench_args: list[str]) -> dict[str, float]:
    """{model: step seconds} from one gpu_train_bench.py process on the package at pkg."""
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_train_bench.py"), *bench_args],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"gpu_train_bench.py on {pkg} failed: {done.stderr.strip().splitlines()[-1:]}")
    steps = {}
    for line in done.stdout.splitlines():
        row = json.loads(line) if line.startswith("{") else {}
        if "error" in row:
            raise SystemExit(f"gpu_train_bench.py on {pkg}: {row['model']}: {row['error']}")
        if "step_s" in row:
            steps[row["model"]] = row["step_s"]
    return steps


def speedups(base_runs: list[dict[str, float]], this_runs: list[dict[str, float]]) -> dict[str, float]:
    """Per model, the median over rounds of base step / this step."""
    return {model: float(np.median([b[model] / t[model] for b, t in zip(base_runs, this_runs)]))
            for model in base_runs[0]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a git revision, or a tar of orchestra_jax/ and kernels/")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(ours)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: needs at least 1")
    with tempfile.TemporaryDirectory(prefix="compare_code_") as tmp:
        work = Path(tmp)
        codes = {"base": package(base_source(args.base, work), work / "base"),
                 "this": package(ROOT, work / "this")}
        runs = {"base": [], "this": []}
        for r in range(args.rounds):
            for name in (("base", "this") if r % 2 == 0 else ("this", "base")):
                runs[name].append(run_bench(codes[name], bench_args))
                print(json.dumps({"round": r + 1, "code": name, "step_s": runs[name][-1]}), flush=True)
    print(json.dumps({"base": args.base, "rounds": args.rounds, "bench_args": bench_args,
                      "speedup_median": {m: round(v, 3) for m, v in speedups(runs["base"], runs["this"]).items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
