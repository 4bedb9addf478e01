"""launch/sglang_fleet.py: commands, health wait, endpoints file, and a real one-server CPU fleet (slow)."""

import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from rollout_helpers import start_server

from orchestra_jax.rollout.sglang_client import read_endpoints

FLEET = pathlib.Path(__file__).resolve().parents[2] / "launch" / "sglang_fleet.py"


def _fleet_module():
    spec = importlib.util.spec_from_file_location("sglang_fleet", FLEET)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sglang_fleet"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sglang_commands_split_gpus_and_ports():
    fleet = _fleet_module()
    args = fleet.FleetArgs(model_path="/ckpt", num_servers=3, gpus_per_server=2, base_port=31000)
    commands = fleet.server_commands(args)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env, _ in commands] == ["0,1", "2,3", "4,5"]
    assert [url for _, _, url in commands] == [f"http://127.0.0.1:{31000 + i}" for i in range(3)]
    argv = commands[1][0]
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--port") + 1] == "31001" and argv[argv.index("--tp-size") + 1] == "2"


def test_wait_and_endpoints_file_round_trip(tiny_model, small_tokenizer, tmp_path):
    fleet = _fleet_module()
    server = start_server(*tiny_model, small_tokenizer)
    try:
        fleet.wait_until_healthy([server.url], timeout_s=60)
        with pytest.raises(TimeoutError, match="127.0.0.1:9"):
            fleet.wait_until_healthy([server.url, "http://127.0.0.1:9"], timeout_s=0.5)
    finally:
        server.stop()
    fleet.write_endpoints(tmp_path / "fleet" / "endpoints.json", [server.url], "/ckpt")
    assert read_endpoints(tmp_path / "fleet" / "endpoints.json") == [server.url]


@pytest.mark.slow
def test_orchestra_jax_fleet_starts_serves_and_stops(tmp_path):
    endpoints = tmp_path / "endpoints.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(FLEET), "--model-path", "qwen3-tiny", "--backend", "orchestra-jax",
         "--base-port", str(port), "--context-length", "128", "--max-running-requests", "2",
         "--dtype", "float32", "--endpoints-file", str(endpoints), "--log-dir", str(tmp_path / "logs")],
        env=dict(os.environ, XLA_FLAGS=""),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not endpoints.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        assert read_endpoints(endpoints) == [f"http://127.0.0.1:{port}"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
