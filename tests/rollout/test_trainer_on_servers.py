"""The trainer with `rollout.engine = 'sglang'`: rollouts over HTTP from a loopback server of ours (the SGLang
protocol), which gets the policy's weights before the first step and once after every step."""

import dataclasses
import json

import httpx
import jax
import numpy as np
import pytest
from rollout_helpers import start_server

from orchestra_jax.config import preset
from orchestra_jax.models import init_params, load_pretrained
from orchestra_jax.rl.checkpoint import load_params, params_digest
from orchestra_jax.rl.trainer import Trainer
from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.runlog import read_scalars


def test_the_trainer_rolls_out_on_a_server_and_syncs_it_once_a_step(tmp_path):
    tiny = preset("test-tiny")
    endpoints = tmp_path / "endpoints.json"
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), steps=1, rollout=dataclasses.replace(
        tiny.rollout, engine="sglang", endpoints_file=str(endpoints), weight_sync_dir=str(tmp_path / "sync")))
    lines = []
    trainer = Trainer(config, echo=lines.append)
    # The server starts with other weights than the policy's: the trainer's first sync must replace them.
    engine = EmbeddedEngine(trainer.model, init_params(trainer.model, jax.random.key(np.random.randint(1 << 30))),
                            max_slots=8, max_context=config.rollout.max_context, weight_version="stale",
                            detokenize=trainer.env.tokenizer.decode)
    server = start_server(trainer.model, None, trainer.env.tokenizer, engine=engine,
                          load_weights=lambda path: load_pretrained(path))
    endpoints.write_text(json.dumps({"endpoints": [server.url]}))
    try:
        assert trainer.train() == 0
        assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == "1"
        _, saved = load_params(tmp_path / "run" / "ckpt")
        assert params_digest(engine._params) == params_digest(saved)  # the server holds step 1's policy
    finally:
        server.stop()
    assert any(line.startswith(f"rollouts: 1 SGLang server(s) from {endpoints}") for line in lines)
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["time/sync_s"][0][1] > 0 and scalars["train/samples"][0][1] > 0


def test_servers_that_cannot_take_weights_stop_the_run_in_one_line(tmp_path):
    from orchestra_jax.config import ConfigError

    tiny = preset("test-tiny")
    endpoints = tmp_path / "endpoints.json"
    config = dataclasses.replace(tiny, run_dir=str(tmp_path / "run"), rollout=dataclasses.replace(
        tiny.rollout, engine="sglang", endpoints_file=str(endpoints), weight_sync_dir=str(tmp_path / "sync")))
    trainer = Trainer(config, echo=lambda *_: None)
    engine = EmbeddedEngine(trainer.model, init_params(trainer.model, jax.random.key(0)), max_slots=2,
                            max_context=64, detokenize=trainer.env.tokenizer.decode)
    server = start_server(trainer.model, None, trainer.env.tokenizer, engine=engine)  # no weight loader
    endpoints.write_text(json.dumps({"endpoints": [server.url]}))
    try:
        with pytest.raises(ConfigError, match=r"the first weight sync failed: .*cannot load weights") as caught:
            trainer.train()
    finally:
        server.stop()
    assert "\n" not in str(caught.value)
