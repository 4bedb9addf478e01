"""Config: presets, CLI overrides, validation messages and the JSON round trip."""

import dataclasses
import json

import pytest
from config_edit import with_field

from orchestra_jax import cli
from orchestra_jax import config as C


def test_presets_validate_and_differ():
    for name in C.PRESETS:
        C.validate(C.preset(name))
    assert C.preset("test-tiny").steps < C.preset("cpu-demo").steps
    assert C.preset("orchestrator-8b").rollout.engine == "sglang"


def test_unknown_preset_names_choices():
    with pytest.raises(C.ConfigError, match="unknown preset 'nope'.*cpu-demo"):
        C.preset("nope")


def test_cli_overrides_apply_on_top_of_preset():
    config = cli.parse_train_config(
        ["--preset", "test-tiny", "--optimizer.lr", "3e-4", "--algorithm.name", "ppo", "--steps", "7"], "t"
    )
    tiny = C.preset("test-tiny")
    assert config.optimizer.lr == 3e-4 and config.algorithm.name == "ppo" and config.steps == 7
    # Everything not overridden keeps the preset's value, not the global default.
    assert config.algorithm.group_size == tiny.algorithm.group_size
    assert config.rollout.max_new_tokens == tiny.rollout.max_new_tokens


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus", "1"], "Unrecognized options: --bogus"),
        (["--optimizer.lr", "abc"], "--optimizer.lr"),
        (["--algorithm.name", "xx"], "'xx'"),
        (["--steps", "0"], "steps=0: must be positive"),
        (["--rollout.top-p", "1.5"], "rollout.top_p"),
        (["--preset", "nope"], "unknown preset"),
    ],
)
def test_bad_flags_give_one_line(argv, message):
    with pytest.raises(cli.UsageError) as info:
        cli.parse_train_config(argv, "t")
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(algorithm=C.AlgorithmConfig(group_size=1)), "algorithm.group_size"),
        (dict(algorithm=C.AlgorithmConfig(dual_clip=0.5)), "algorithm.dual_clip"),
        (dict(rollout=C.RolloutConfig(max_new_tokens=4096, max_context=4096)), "rollout.max_new_tokens"),
        (dict(rollout=C.RolloutConfig(engine="sglang")), "rollout.endpoints_file"),
        (dict(mesh=C.MeshConfig(data=-1, fsdp=-1)), "mesh"),
        (dict(mesh=C.MeshConfig(data=0)), "mesh.data"),
        (dict(optimizer=C.OptimizerConfig(lr=-1.0)), "optimizer.lr"),
    ],
)
def test_validation_names_the_field(change, field):
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
        C.validate(dataclasses.replace(C.cpu_demo(), **change))


@pytest.mark.parametrize(
    "path, value",
    [
        ("algorithm.kl_coef", -0.1),
        ("algorithm.sft_batch_size", 0),
        ("algorithm.sft_lr", 0.0),
        ("algorithm.sft_lr", -1e-3),
        ("algorithm.sft_steps", -1),
        ("optimizer.b1", 1.0),
        ("optimizer.b1", -0.1),
        ("optimizer.b2", 1.0),
        ("optimizer.b2", -0.5),
        ("optimizer.grad_clip", 0.0),
        ("optimizer.grad_clip", -1.0),
        ("optimizer.warmup_steps", -1),
        ("rollout.min_p", -0.1),
        ("rollout.min_p", 1.5),
    ],
)
def test_out_of_range_values_name_field_and_value(path, value):
    with pytest.raises(C.ConfigError) as info:
        C.validate(with_field(C.cpu_demo(), path, value))
    assert str(info.value).startswith(f"config field {path}={value!r}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "path, value",
    [("algorithm.kl_coef", 0.0), ("algorithm.sft_steps", 0), ("optimizer.b1", 0.0), ("optimizer.b2", 0.0),
     ("optimizer.warmup_steps", 0), ("rollout.min_p", 0.0), ("rollout.min_p", 1.0)],
)
def test_range_edges_stay_valid(path, value):
    C.validate(with_field(C.cpu_demo(), path, value))


def test_batch_must_divide_over_data_axes():
    config = dataclasses.replace(
        C.cpu_demo(),
        algorithm=C.AlgorithmConfig(prompts_per_step=3, group_size=3, micro_batch_size=8),
        mesh=C.MeshConfig(data=-1, fsdp=1, tensor=1),
    )
    with pytest.raises(C.ConfigError, match=r"rollouts per step \(9\).*8 devices"):
        C.validate(config, num_devices=8)
    C.validate(config, num_devices=1)  # one device divides anything


def test_cudnn_attention_is_refused_where_it_cannot_run():
    """The CPU test run has no cuDNN: asking for it fails before any work, naming the field."""
    demo = C.cpu_demo()
    config = dataclasses.replace(demo, model=dataclasses.replace(demo.model, attention="cudnn"))
    with pytest.raises(C.ConfigError, match=r"model\.attention='cudnn': attention 'cudnn' needs a GPU"):
        C.validate(config, num_devices=1)


def test_json_round_trip(tmp_path):
    config = cli.parse_train_config(["--preset", "orchestrator-8b", "--reward.advantage-clip", "None"], "t")
    path = tmp_path / "run" / "config.json"
    C.save_config(config, path)
    assert C.load_config(path) == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".config-")]  # no temp file left behind


def test_load_config_errors_name_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"steps": 3,\n "optimizer": {"lr": "fast"}}')
    with pytest.raises(C.ConfigError, match=r"config\.json\.optimizer\.lr: bad value 'fast'"):
        C.load_config(path)
    path.write_text('{"steps": 3, "optimiser": {}}')
    with pytest.raises(C.ConfigError, match="unknown field 'optimiser'"):
        C.load_config(path)
    path.write_text('{"steps": 3,\n oops}')
    with pytest.raises(C.ConfigError, match=r"config\.json:2: invalid JSON"):
        C.load_config(path)
    with pytest.raises(C.ConfigError, match="no such config file"):
        C.load_config(tmp_path / "missing.json")


def test_config_subcommand_prints_resolved_json(capsys):
    assert cli.main(["config", "--preset", "test-tiny", "--seed", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["name"] == "test-tiny"
