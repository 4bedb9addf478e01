"""The jitted train step: sharded == 1 device, gradient accumulation == one big batch, the NaN guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from orchestra_jax.config import MeshConfig, OptimizerConfig
from orchestra_jax.models import transformer
from orchestra_jax.models.transformer import init_params
from orchestra_jax.models.transformer_config import get_preset
from orchestra_jax.parallel.mesh import batch_ways, make_mesh
from orchestra_jax.rl.batching import Sample, pack
from orchestra_jax.rl.losses import PolicyLossConfig
from orchestra_jax.rl.optimizer import make_optimizer
from orchestra_jax.rl.train_step import LogprobFn, StepSettings, make_train_step

VOCAB = 96


def tiny_model():
    return dataclasses.replace(get_preset("qwen3-tiny", vocab_size=VOCAB), num_layers=1, hidden_size=32,
                               intermediate_size=64, head_dim=16)


def random_samples(rng, n):
    out = []
    for _ in range(n):
        length = int(rng.integers(6, 40))
        mask = np.zeros(length, np.int32)
        mask[length // 3 :] = 1
        out.append(Sample(rng.integers(1, VOCAB, length), mask, float(rng.normal()), -rng.random(length) * 3))
    return out


def run_step(settings, mesh, params, batch, ref=None, optimizer=None):
    # Plain SGD where updates are compared: Adam's first step is lr * sign(g), ill-conditioned for tiny g.
    optimizer = optimizer or optax.sgd(0.5)
    step, state = make_train_step(settings, optimizer, mesh, jax.tree.map(jnp.copy, params))
    arrays = dict(batch.arrays)
    if ref is not None:
        arrays["ref_logprobs"] = LogprobFn(settings, mesh, step.shardings.params)(ref, arrays)
    state, metrics = step(state, arrays)
    return jax.device_get(state.params), metrics


def close(a, b, rtol=2e-5, atol=2e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("shape, tiled", [
    ((2, 2, 2), False), pytest.param((8, 1, 1), False, marks=pytest.mark.slow),
    pytest.param((1, 4, 2), False, marks=pytest.mark.slow),
    ((2, 2, 2), True),  # the long-row attention tiles, TILED_FROM lowered to the rows (tiles of 16 tokens)
])
def test_sharded_step_matches_one_device(shape, tiled, monkeypatch):
    if tiled:
        monkeypatch.setattr(transformer, "TILED_FROM", 16)
        monkeypatch.setattr(transformer, "TILE_ROWS", 16)
    rng = np.random.default_rng()
    model = tiny_model()
    params = init_params(model, jax.random.key(int(rng.integers(1 << 30))))
    settings = StepSettings(model=model, loss=PolicyLossConfig(kl_coef=0.0, tis_cap=2.0))
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    many = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    batch = pack(random_samples(rng, 12), micro_batch_size=8, max_row_len=64, row_multiple=batch_ways(many))
    assert transformer.causal_schedule(batch.shape[-1])[0] == tiled
    p1, m1 = run_step(settings, one, params, batch)
    p8, m8 = run_step(settings, many, params, batch)
    close(p8, p1)
    assert m1["skipped"] == 0 and m8["skipped"] == 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    # The update moved the params.
    assert not np.allclose(p1["layers"]["q"], params["layers"]["q"])


def test_gradient_accumulation_matches_one_micro_batch():
    rng = np.random.default_rng()
    model = tiny_model()
    params = init_params(model, jax.random.key(1))
    samples = random_samples(rng, 10)
    big = pack(samples, micro_batch_size=16, max_row_len=64, row_multiple=1)
    small = pack(samples, micro_batch_size=2, max_row_len=64, row_multiple=1)
    assert big.shape[0] == 1 and small.shape[0] > 1
    settings = StepSettings(model=model, loss=PolicyLossConfig())
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    p_big, m_big = run_step(settings, mesh, params, big)
    p_small, m_small = run_step(settings, mesh, params, small)
    np.testing.assert_allclose(m_small["loss"], m_big["loss"], rtol=1e-5, atol=1e-6)
    close(p_small, p_big, rtol=1e-4, atol=1e-5)


def test_nan_guard_skips_the_update():
    rng = np.random.default_rng()
    model = tiny_model()
    params = init_params(model, jax.random.key(2))
    batch = pack(random_samples(rng, 4), micro_batch_size=8, max_row_len=64, row_multiple=1)
    batch.arrays["advantages"][0, 0, 3] = np.nan
    batch.arrays["mask"][0, 0, 3] = 1.0
    batch.arrays["weights"][0, 0, 3] = 0.1
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    new_params, metrics = run_step(StepSettings(model=model, loss=PolicyLossConfig()), mesh, params, batch)
    assert metrics["skipped"] == 1.0
    close(new_params, jax.device_get(params), rtol=0, atol=0)


@pytest.mark.slow
def test_kl_to_reference_bf16_and_ppo_run():
    rng = np.random.default_rng()
    model = tiny_model()
    params = init_params(model, jax.random.key(3))
    ref = init_params(model, jax.random.key(4))
    samples = [dataclasses.replace(s, reward=1.0) for s in random_samples(rng, 6)]
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    settings = StepSettings(model=model, loss=PolicyLossConfig(kl_coef=0.1), use_reference=True,
                            compute_dtype="bfloat16", remat="full")
    adamw = make_optimizer(OptimizerConfig(lr=1e-3, schedule="cosine", warmup_steps=2), 10)
    batch = pack(samples, micro_batch_size=4, max_row_len=64, row_multiple=1)
    new_params, metrics = run_step(settings, mesh, params, batch, ref=ref, optimizer=adamw)
    assert metrics["kl"] > 0 and metrics["skipped"] == 0 and np.isfinite(metrics["loss"])
    assert new_params["embed"].dtype == jnp.float32
    ppo = StepSettings(model=model, loss=PolicyLossConfig(), algorithm="ppo")
    batch = pack(samples, micro_batch_size=4, max_row_len=64, row_multiple=1, one_per_row=True)
    _, metrics = run_step(ppo, mesh, params, batch)
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"])


def test_a_small_step_raises_positive_advantage_tokens_and_lowers_negative_ones():
    """The sign end to end: behaviour log-probs from the policy itself (ratio 1), one small SGD step."""
    rng = np.random.default_rng()
    model = tiny_model()
    params = init_params(model, jax.random.key(int(rng.integers(1 << 30))))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    settings = StepSettings(model=model, loss=PolicyLossConfig())
    samples = random_samples(rng, 2)
    samples = [dataclasses.replace(s, advantage=a) for s, a in zip(samples, (1.0, -1.0))]
    batch = pack(samples, micro_batch_size=2, max_row_len=64, row_multiple=1, one_per_row=True)
    step, _ = make_train_step(settings, optax.sgd(1e-3), mesh, params)
    before = LogprobFn(settings, mesh, step.shardings.params)(params, batch.arrays)
    arrays = {**batch.arrays, "behaviour_logprobs": before}
    after_params, _ = run_step(settings, mesh, params, dataclasses.replace(batch, arrays=arrays),
                               optimizer=optax.sgd(1e-3))
    after = LogprobFn(settings, mesh, step.shardings.params)(after_params, batch.arrays)
    advantages, mask = batch.arrays["advantages"], batch.arrays["mask"] > 0
    gain = ((after - before) * mask).sum(-1)  # summed over each row's policy tokens
    row_sign = np.sign((advantages * mask).sum(-1))
    assert np.all(gain[row_sign > 0] > 0) and np.all(gain[row_sign < 0] < 0), (gain, row_sign)


def test_attention_layout_is_found_on_the_host_for_cudnn_only(monkeypatch):
    """cuDNN's call for a batch's packed rows becomes a static setting of the compiled step; other attention
    paths have no such setting (None: one compiled step for every batch)."""
    import orchestra_jax.models.transformer as T
    from orchestra_jax.rl.train_step import attention_layout

    rng = np.random.default_rng()
    batch = pack(random_samples(rng, 12), micro_batch_size=4, max_row_len=64, row_multiple=1).arrays
    settings = StepSettings(model=tiny_model(), loss=PolicyLossConfig(), compute_dtype="bfloat16")
    assert attention_layout(settings, batch["segment_ids"]) == (
        T.host_packed_layout(batch["segment_ids"]) if jax.default_backend() == "gpu" else None)
    monkeypatch.setattr(T.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(T, "cudnn_packs", lambda: True)
    one_per_row = np.zeros((1, 2, 8), np.int32)
    one_per_row[0, :, :5] = 1
    several = one_per_row.copy()
    several[0, 0, 3:5] = 2
    assert attention_layout(settings, one_per_row) == 0
    assert attention_layout(settings, several) == 1
    assert attention_layout(dataclasses.replace(settings, compute_dtype="float32"), several) is None
    assert attention_layout(dataclasses.replace(settings, attention="xla"), several) is None
    monkeypatch.setattr("orchestra_jax.rl.train_step.HOST_ATTENTION_LAYOUT", False)  # picked on the device
    assert attention_layout(settings, several) is None
