"""The dry-run plan: activation memory counted from the traced backward (checked by hand and against
XLA), the mesh it plans for, and whether a device holds it."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from config_edit import with_field

from orchestra_jax import config as C
from orchestra_jax.config import MeshConfig
from orchestra_jax.models.transformer import init_params
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import make_mesh
from orchestra_jax.rl import plan
from orchestra_jax.rl.batching import Sample, pack
from orchestra_jax.rl.environment import model_config
from orchestra_jax.rl.losses import PolicyLossConfig
from orchestra_jax.rl.train_step import StepSettings, make_train_step, saved_activation_bytes


def test_each_layer_keeps_what_its_remat_policy_names():
    """Qwen3-8B in bf16 on one 32768-token row: remat "dots" keeps, per layer and token, the layer's input, both
    norm outputs and the residual after attention (4 x hidden), q and the attention output (2 x heads x head_dim),
    k and v (2 x kv heads x head_dim), gate and up (2 x intermediate), and a float32 log-sum-exp per head; "full"
    keeps the layer's input only."""
    model = get_preset("qwen3-8b")
    d, f, nh, kh, n, t = 4096, 12288, 32 * 128, 8 * 128, 32, 32768

    def per_layer(remat):
        settings = StepSettings(model=model, loss=PolicyLossConfig(kl_coef=0.0), compute_dtype="bfloat16",
                                remat=remat)
        two, one = (saved_activation_bytes(dataclasses.replace(settings, model=dataclasses.replace(model, num_layers=k)),
                                           1, t) for k in (2, 1))
        return two - one

    assert per_layer("dots") == t * (2 * (4 * d + 2 * nh + 2 * kh + 2 * f) + 4 * n)
    assert per_layer("full") == t * 2 * d
    assert per_layer("none") > per_layer("dots")


def test_the_plan_counts_the_devices_share_of_the_activations():
    """orchestrator-8b on 8 devices (fsdp 8): one 32768-token row a device, remat full."""
    config = C.orchestrator_8b()
    act = {remat: plan.estimate(with_field(config, "model.remat", remat), 8)["memory_gib_per_device"]["activations"]
           for remat in ("full", "dots", "none")}
    assert 36 * 32768 * 4096 * 2 / 2**30 < act["full"] < act["dots"] < act["none"]
    # Twice the rows a device (the batch over 4 devices) is about twice the activations.
    four = plan.estimate(dataclasses.replace(config, mesh=MeshConfig(data=1, fsdp=4, tensor=1)), 4)
    assert four["memory_gib_per_device"]["activations"] == pytest.approx(2 * act["full"], rel=0.02)
    # A step of two rollouts packs two rows, whatever the micro-batch size.
    one_device = dataclasses.replace(config, mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    two = with_field(with_field(one_device, "algorithm.prompts_per_step", 1), "algorithm.group_size", 2)
    assert plan.estimate(two, 1)["memory_gib_per_device"] == \
        plan.estimate(with_field(one_device, "algorithm.micro_batch_size", 2), 1)["memory_gib_per_device"]


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_the_activation_count_matches_what_xla_keeps_on_the_cpu(remat):
    """XLA's own buffer assignment for the compiled step: its temporaries less the float32 gradients are what
    the backward keeps and works in. float32 compute and short rows: with bf16 XLA's CPU keeps some stacks in
    float32, and at long rows it holds several attention blocks' scores at once; the count is for accelerators,
    which do neither (fused attention there)."""
    model = dataclasses.replace(get_preset("qwen3-tiny", vocab_size=512), hidden_size=256, intermediate_size=768,
                                num_heads=4, num_kv_heads=2, head_dim=64)
    config = with_field(with_field(with_field(C.test_tiny(), "model.remat", remat), "rollout.max_context", 512),
                   "algorithm.micro_batch_size", 1)
    counted = plan.activation_bytes(config, model, rows=1, tensor_ways=1)

    rng = np.random.default_rng()
    batch = pack([Sample(rng.integers(1, model.vocab_size, 512), np.ones(512, np.int32), 1.0, -rng.random(512))],
                 micro_batch_size=1, max_row_len=512, row_multiple=1)
    settings = StepSettings(model=model, loss=PolicyLossConfig(kl_coef=0.0), remat=remat)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    step, state = make_train_step(settings, optax.adamw(1e-5), mesh, init_params(model, jax.random.key(0)))
    temp = step.lower(state, dict(batch.arrays)).compile().memory_analysis().temp_size_in_bytes
    kept = temp - 4 * model.num_params()
    assert 0.8 < counted / kept < 1.25, (counted, kept)


def test_the_plan_says_whether_a_device_holds_it():
    config = C.orchestrator_8b()
    assert "GiB a device, within one H100's 80 GiB" in plan.describe(config, 8)
    line = next(x for x in plan.describe(with_field(config, "model.remat", "none"), 8).splitlines() if "memory:" in x)
    assert "MORE than one H100's 80 GiB" in line and "--model.remat full" in line


def test_a_dry_run_plans_for_the_mesh_asked_for_on_a_smaller_host():
    config = with_field(with_field(with_field(C.orchestrator_8b(), "mesh.data", 2), "mesh.fsdp", 16), "mesh.tensor", 1)
    text = plan.describe(config, 1)
    assert "this host has 1 device(s); estimated for the 32 the mesh asks for" in text
    assert '"devices": 32' in text and '"fsdp": 16' in text


@pytest.mark.parametrize("mesh, shards", [(MeshConfig(data=-1, fsdp=1, tensor=1), 1),
                                          (MeshConfig(data=1, fsdp=-1, tensor=1), 8)])
def test_a_compiled_dry_run_reports_xlas_figures_for_this_hosts_devices(mesh, shards):
    """On the 8 test devices: the donated state XLA counts is each device's share of 12 B a parameter (float32
    params and AdamW's two moments), and the micro-batch holds a multiple of the data-parallel devices' rows."""
    config = dataclasses.replace(C.test_tiny(), mesh=mesh)
    xla = plan.compiled_memory(config)
    params = model_config(config, None).num_params()
    assert xla["devices"] == 8 and xla["rows"] == 8
    sizes = xla["bytes_per_device"]
    assert sizes["outputs"] == pytest.approx(12 * params / shards, rel=0.05)
    assert 0 <= sizes["outputs"] - sizes["aliased"] < 1024 and sizes["temporaries"] > 0  # all but scalars donated


def test_dry_run_compile_prints_xlas_line_and_a_missing_device_is_one_line(capsys):
    from orchestra_jax import cli

    argv = ["train", "--preset", "test-tiny", "--dry-run", "--dry-run-compile"]
    assert cli.main([*argv, "--mesh.data", "-1"]) == 0
    out = capsys.readouterr().out
    assert "compiled for this host's 8 cpu device(s)" in out and "XLA: " in out and "the estimate for these" in out
    assert cli.main([*argv, "--mesh.data", "16"]) == 2
    err = capsys.readouterr().err
    assert "needs 16 devices but 8 are present" in err and "Traceback" not in err
