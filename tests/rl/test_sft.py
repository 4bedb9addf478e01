"""The `sft` command's run: SIGTERM saves the step reached, --resume goes on to bitwise the same weights."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from orchestra_jax.config import ConfigError, preset
from orchestra_jax.rl import commands
from orchestra_jax.rl.checkpoint import load_params, params_digest


def _demonstrations(path):
    rng = np.random.default_rng()
    rows = []
    for _ in range(6):
        ids = rng.integers(1, 200, rng.integers(8, 30)).tolist()
        rows.append({"token_ids": ids, "loss_mask": [0] * 4 + [1] * (len(ids) - 4)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_sigterm_saves_the_step_reached_and_resume_goes_on_exactly(tmp_path):
    data = _demonstrations(tmp_path / "demos.jsonl")
    tiny = dataclasses.replace(preset("test-tiny"), steps=4, algorithm=dataclasses.replace(
        preset("test-tiny").algorithm, sft_batch_size=4, sft_lr=0.01))
    whole = dataclasses.replace(tiny, run_dir=str(tmp_path / "whole"))
    commands.run_sft(whole, data, None, echo=lambda *_: None)
    expected = params_digest(load_params(tmp_path / "whole" / "ckpt")[1])

    def echo(line):
        if line.startswith("sft step 1/"):  # a real signal: the command's handler must be in place
            os.kill(os.getpid(), signal.SIGTERM)

    cut = dataclasses.replace(tiny, run_dir=str(tmp_path / "cut"))
    summary = commands.run_sft(cut, data, None, echo=echo)
    assert summary["terminated"] and summary["steps"] == 1
    assert load_params(tmp_path / "cut" / "ckpt")[0] == 1
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        commands.run_sft(cut, data, None, echo=lambda *_: None)
    lines = []
    summary = commands.run_sft(dataclasses.replace(cut, resume=True), data, None, echo=lines.append)
    assert "resumed from step 1" in lines and summary["steps"] == 4 and "terminated" not in summary
    step, params = load_params(tmp_path / "cut" / "ckpt")
    assert step == 4 and params_digest(params) == expected
