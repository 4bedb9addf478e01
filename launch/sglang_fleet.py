"""Start N rollout servers on one node, wait until each answers, write the endpoints file the client reads.

    python launch/sglang_fleet.py --model-path /shared/ckpt/step-0 --num-servers 4 --gpus-per-server 2 \
        --endpoints-file /shared/run/endpoints.json

Each server is `python -m sglang.launch_server` on its own GPUs (CUDA_VISIBLE_DEVICES) and port, with the flags
RL rollouts want (see launch/README.md). `--backend orchestra-jax` starts `orchestra-jax serve` instead (CPU,
TPU, or a GPU without SGLang). The script stays in the foreground supervising its servers: if one dies it
stops the others and exits non-zero; Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Literal

import httpx
import tyro


@dataclasses.dataclass(frozen=True)
class FleetArgs:
    model_path: str
    """Checkpoint directory every server loads first (later updates come through /update_weights_from_disk)."""
    num_servers: int = 1
    gpus_per_server: int = 1
    """Tensor-parallel size of each SGLang server (--tp-size); servers take consecutive GPU ids."""
    first_gpu: int = 0
    host: str = "127.0.0.1"
    base_port: int = 30000
    endpoints_file: str = "endpoints.json"
    backend: Literal["sglang", "orchestra-jax"] = "sglang"
    context_length: int = 32768
    mem_fraction_static: float = 0.8
    max_running_requests: int = 256
    dtype: str = "bfloat16"
    random_seed: int = 0
    startup_timeout_s: float = 900.0
    log_dir: str = "fleet-logs"
    extra_args: tuple[str, ...] = ()
    """Passed verbatim to every server, e.g. --extra-args --attention-backend fa3."""
    dry_run: bool = False
    """Print the commands and the endpoints file, start nothing."""


def server_commands(args: FleetArgs) -> list[tuple[list[str], dict[str, str], str]]:
    """(argv, extra environment, url) for each server."""
    out = []
    for i in range(args.num_servers):
        port = args.base_port + i
        url = f"http://{args.host}:{port}"
        if args.backend == "sglang":
            gpus = range(
                args.first_gpu + i * args.gpus_per_server, args.first_gpu + (i + 1) * args.gpus_per_server
            )
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
            argv = [
                sys.executable, "-m", "sglang.launch_server",
                "--model-path", args.model_path,
                "--host", args.host, "--port", str(port),
                "--tp-size", str(args.gpus_per_server),
                "--context-length", str(args.context_length),
                "--mem-fraction-static", str(args.mem_fraction_static),
                "--max-running-requests", str(args.max_running_requests),
                "--dtype", args.dtype,
                "--random-seed", str(args.random_seed),
                "--skip-server-warmup",
            ]  # fmt: skip
        else:
            env = {}
            argv = [
                sys.executable, "-m", "orchestra_jax", "serve",
                "--model-path", args.model_path,
                "--host", args.host, "--port", str(port),
                "--context-length", str(args.context_length),
                "--max-running-requests", str(args.max_running_requests),
                "--dtype", "float32" if args.dtype == "float32" else "bfloat16",
                "--random-seed", str(args.random_seed),
            ]  # fmt: skip
        out.append((argv + list(args.extra_args), env, url))
    return out


def wait_until_healthy(urls: list[str], timeout_s: float, alive=lambda: True) -> None:
    """Poll /health_generate (503 while SGLang starts) until every server answers 200. Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        for url in list(pending):
            try:
                if httpx.get(url + "/health_generate", timeout=30).status_code == 200:
                    pending.remove(url)
            except httpx.HTTPError:
                pass
        if pending and not alive():
            raise RuntimeError(f"a server exited before it became healthy (waiting on {', '.join(pending)})")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"servers not healthy after {timeout_s:.0f}s: {', '.join(pending)}")
        if pending:
            time.sleep(1.0)


def write_endpoints(path: str | os.PathLike, urls: list[str], model_path: str) -> None:
    """The endpoints file (JSON) that orchestra_jax.rollout.sglang_client.read_endpoints reads; atomic."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"endpoints": urls, "model_path": model_path}, f, indent=2)
    os.replace(tmp, path)


def run_fleet(args: FleetArgs) -> int:
    commands = server_commands(args)
    urls = [url for _, _, url in commands]
    if args.dry_run:
        for argv, env, _ in commands:
            print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(argv))
        print(json.dumps({"endpoints": urls, "model_path": args.model_path}, indent=2))
        return 0
    logs = pathlib.Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def stop_all(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(0)))
    try:
        for i, (argv, env, url) in enumerate(commands):
            log = open(logs / f"server-{i}.log", "w")  # noqa: SIM115 - closed with the process at exit
            procs.append(
                subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
            )
            print(f"server {i}: {url} (pid {procs[-1].pid}, log {logs / f'server-{i}.log'})", flush=True)
        wait_until_healthy(urls, args.startup_timeout_s, alive=lambda: all(p.poll() is None for p in procs))
        write_endpoints(args.endpoints_file, urls, args.model_path)
        print(f"{len(urls)} servers healthy; endpoints in {args.endpoints_file}", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(2.0)
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        print(f"server(s) {dead} exited; stopping the fleet", file=sys.stderr)
        return 1
    except (TimeoutError, RuntimeError) as e:
        print(f"sglang_fleet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(run_fleet(tyro.cli(FleetArgs)))
