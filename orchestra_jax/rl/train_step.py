"""The train step: ONE jax.jit over the mesh with explicit shardings and donated state.

Inside: micro-batches of packed rows run through `lax.scan` (gradient accumulation), each computing token
log-probs with the fused LM-head kernel on the model's final hidden states, the GRPO/PPO per-token loss
(losses.py) and its gradient. The aggregation weights carry the global normaliser, so the summed micro-batch
gradients are exactly the full-batch gradient. A NaN/Inf anywhere in the loss or gradients skips the update
(params and optimizer state are kept) and reports `skipped = 1`.

Params and optimizer state stay float32; `compute_dtype` (e.g. bfloat16) applies to activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orchestra_jax.kernels import fused_logprob, gae
from orchestra_jax.models.transformer import (
    attention_impl,
    hidden_states,
    host_packed_layout,
    init_params,
    lm_head_weight,
    param_logical_axes,
)
from orchestra_jax.models.transformer_config import TransformerConfig
from orchestra_jax.parallel.mesh import logical_to_spec, tree_shardings
from orchestra_jax.rl.losses import PolicyLossConfig, policy_objective, value_loss

BATCH_KEYS = (
    "tokens", "targets", "positions", "segment_ids", "mask", "weights", "advantages", "behaviour_logprobs",
    "rewards", "ref_logprobs",
)
STAT_NAMES = ("kl", "entropy", "clip_low", "clip_high", "dual_clip", "tis_truncated", "ratio")
# False: the step picks cuDNN's attention call on the device, a conditional (`attention_layout`); for comparisons.
HOST_ATTENTION_LAYOUT = True


class TrainState(NamedTuple):
    """Everything the step updates: a step counter, the policy, the critic (PPO's value head; {} for GRPO)
    and the optimizer state over {"policy": params, "critic": critic}."""

    step: jax.Array
    params: Any
    critic: Any
    opt_state: Any


@dataclass(frozen=True)
class StepSettings:
    """Static settings of the compiled step."""

    model: TransformerConfig
    loss: PolicyLossConfig
    algorithm: Literal["grpo", "ppo"] = "grpo"
    compute_dtype: str | None = None
    remat: str = "none"
    temperature: float = 1.0
    gamma: float = 1.0
    gae_lambda: float = 1.0
    value_coef: float = 0.5
    use_reference: bool = False
    logprob_impl: str = "auto"
    attention: str = "auto"
    attention_layout: int | None = None  # set per batch by TrainStep and LogprobFn (`attention_layout`)


def attention_layout(settings: StepSettings, segment_ids: Any) -> int | None:
    """cuDNN's attention call for a batch's packed rows ([micro_batches, rows, row_len] segment ids), found on
    the host so the compiled step has no conditional around its attention; None where the step's attention
    is not cuDNN. Each layout a run meets compiles the step once."""
    *_, b, t = np.shape(segment_ids)
    dtype = settings.compute_dtype or jnp.float32
    if not HOST_ATTENTION_LAYOUT or attention_impl(settings.attention, dtype, b * t * t) != "cudnn":
        return None
    return host_packed_layout(segment_ids)


def _jitted_for(cache: dict, settings: StepSettings, batch: dict, build: Callable[[StepSettings], Any]):
    """The jitted function for this batch's attention layout: build(settings with that layout), on first use."""
    layout = attention_layout(settings, batch["segment_ids"])
    if layout not in cache:
        cache[layout] = build(replace(settings, attention_layout=layout))
    return cache[layout]


def init_critic(model: TransformerConfig, algorithm: str) -> dict[str, jax.Array]:
    """PPO's value head on the final hidden state (zeros: V = 0 at the start); GRPO has no critic."""
    if algorithm != "ppo":
        return {}
    return {"w": jnp.zeros((model.hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def init_train_state(model: TransformerConfig, params: Any, optimizer: optax.GradientTransformation,
                     algorithm: str = "grpo") -> TrainState:
    critic = init_critic(model, algorithm)
    opt_state = optimizer.init({"policy": params, "critic": critic})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, critic=critic, opt_state=opt_state)


def state_shardings(mesh: Mesh, model: TransformerConfig, state: TrainState,
                    optimizer: optax.GradientTransformation) -> TrainState:
    """NamedShardings for every leaf of the state: params by their logical axes, optimizer moments like
    their params, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    policy = tree_shardings(mesh, param_logical_axes(model))
    critic = jax.tree.map(lambda _: replicated, state.critic)
    trainable = {"policy": policy, "critic": critic}
    opt = optax.tree_map_params(
        optimizer, lambda _, s: s, state.opt_state, trainable, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(step=replicated, params=policy, critic=critic, opt_state=opt)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[micro_batches, rows, row_len]: rows split over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec((None, "batch", "seq")))


def token_logprobs(settings: StepSettings, params: Any, mb: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    """(log p(target) [B, T], entropy [B, T], hidden [B, T, D]) for one micro-batch of packed rows."""
    hidden_BTD, _ = hidden_states(
        settings.model, params, mb["tokens"], positions_BT=mb["positions"], segment_ids_BT=mb["segment_ids"],
        compute_dtype=settings.compute_dtype, remat=settings.remat, attention=settings.attention,
        layout=settings.attention_layout,
    )
    b, t, d = hidden_BTD.shape
    w_DV = lm_head_weight(settings.model, params)  # fused_logprob casts it to the hidden dtype chunk by chunk
    logp_N, entropy_N = fused_logprob(
        hidden_BTD.reshape(b * t, d), w_DV, mb["targets"].reshape(b * t), temperature=settings.temperature,
        return_entropy=True, impl=settings.logprob_impl,
    )
    return logp_N.reshape(b, t), entropy_N.reshape(b, t), hidden_BTD


def _microbatch_loss(settings: StepSettings, trainable: dict, mb: dict[str, jax.Array]):
    logp_BT, entropy_BT, hidden_BTD = token_logprobs(settings, trainable["policy"], mb)
    ref_BT = mb["ref_logprobs"] if settings.use_reference else None
    mask_BT = mb["mask"]
    if settings.algorithm == "ppo":
        critic = trainable["critic"]
        values_BT = jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), critic["w"]) + critic["b"]
        advantages_BT, returns_BT = gae(
            mb["rewards"], jax.lax.stop_gradient(values_BT), mask_BT, gamma=settings.gamma, lam=settings.gae_lambda
        )
    else:
        advantages_BT = mb["advantages"]
    loss_BT, stats = policy_objective(
        logp_BT, advantages_BT, settings.loss, behaviour_logp=mb["behaviour_logprobs"], ref_logp=ref_BT,
        entropy=entropy_BT,
    )
    if settings.algorithm == "ppo":
        loss_BT = loss_BT + settings.value_coef * value_loss(values_BT, returns_BT)
    loss = jnp.sum(loss_BT * mb["weights"])
    sums = {name: jnp.sum(stats[name] * mask_BT) for name in STAT_NAMES if name in stats}
    sums["logprob"] = jnp.sum(jax.lax.stop_gradient(logp_BT) * mask_BT)
    sums["behaviour_logprob_diff"] = jnp.sum(jnp.abs(jax.lax.stop_gradient(logp_BT) - mb["behaviour_logprobs"]) * mask_BT)
    sums["tokens"] = jnp.sum(mask_BT)
    return loss, sums


def saved_activation_bytes(settings: StepSettings, rows: int, row_len: int) -> int:
    """Bytes one micro-batch's backward reads back from its forward (what the remat policy keeps), counted from
    the pullback's residuals traced on abstract shapes: nothing is allocated or compiled, so `--dry-run` can
    size an 8B step on a laptop. The parameters are not counted (the state holds them). A backend may keep
    more: XLA's CPU holds remat "none"'s stacked bf16 activations in float32, about twice this."""
    trainable = jax.eval_shape(lambda: {"policy": init_params(settings.model, jax.random.key(0)),
                                        "critic": init_critic(settings.model, settings.algorithm)})
    ints = ("tokens", "targets", "positions", "segment_ids")
    mb = {k: jax.ShapeDtypeStruct((rows, row_len), jnp.int32 if k in ints else jnp.float32) for k in BATCH_KEYS}

    def residuals(trainable, mb):
        _, pullback, _ = jax.vjp(lambda tr: _microbatch_loss(settings, tr, mb), trainable, has_aux=True)
        return jax.tree.leaves(pullback)

    jaxpr = jax.make_jaxpr(residuals)(trainable, mb).jaxpr
    inputs = set(map(id, jaxpr.invars))
    saved = {id(v): v.aval for v in jaxpr.outvars if id(v) not in inputs}
    return sum(aval.size * aval.dtype.itemsize for aval in saved.values())


def _step(settings: StepSettings, optimizer: optax.GradientTransformation, state: TrainState,
          batch: dict[str, jax.Array]):
    trainable = {"policy": state.params, "critic": state.critic}
    grad_fn = jax.value_and_grad(lambda tr, mb: _microbatch_loss(settings, tr, mb), has_aux=True)

    def accumulate(grads, mb):
        (mb_loss, mb_sums), mb_grads = grad_fn(trainable, mb)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads, mb_grads), (mb_loss, mb_sums)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    grads, (losses, per_mb_sums) = jax.lax.scan(accumulate, zeros, batch)
    loss = jnp.sum(losses)
    sums = {k: jnp.sum(v) for k, v in per_mb_sums.items()}

    # The norm is NaN or Inf when any gradient is (or when its square sum overflows float32: skipped too).
    # A cond, not a select per leaf: a select reads and writes params and both moments again, which cost
    # more than the AdamW update itself on the CPU.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

    def update():
        updates, new_opt_state = optimizer.update(grads, state.opt_state, trainable)
        return optax.apply_updates(trainable, updates), new_opt_state

    new_trainable, new_opt_state = jax.lax.cond(finite, update, lambda: (trainable, state.opt_state))

    count = jnp.maximum(sums.pop("tokens"), 1.0)
    metrics = {k: v / count for k, v in sums.items()}
    metrics["clip_fraction"] = metrics.get("clip_low", 0.0) + metrics.get("clip_high", 0.0)
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(new_trainable["policy"]),
        skipped=1.0 - finite.astype(jnp.float32),
        loss_tokens=count,
    )
    new_state = TrainState(
        step=state.step + 1, params=new_trainable["policy"], critic=new_trainable["critic"], opt_state=new_opt_state
    )
    return new_state, metrics


class TrainStep:
    """The compiled step bound to a mesh: `state, metrics = train_step(state, batch_arrays)`.

    `batch_arrays` is PackedBatch.arrays (numpy, [micro_batches, rows, row_len]), plus `ref_logprobs` (from
    `LogprobFn` on the reference params) when the settings use a reference. Metrics come back as floats.
    The state argument is donated: do not use it after the call.
    """

    def __init__(self, settings: StepSettings, optimizer: optax.GradientTransformation, mesh: Mesh,
                 shardings: TrainState):
        self.settings, self.optimizer, self.mesh, self.shardings = settings, optimizer, mesh, shardings
        self._batch_sharding = batch_sharding(mesh)
        self._jitted_by_layout = {}

    def _jitted(self, batch: dict):
        def build(settings):
            return jax.jit(
                lambda state, batch: _step(settings, self.optimizer, state, batch),
                in_shardings=(self.shardings, self._batch_sharding),
                out_shardings=(self.shardings, NamedSharding(self.mesh, PartitionSpec())),
                donate_argnums=(0,),
            )

        return _jitted_for(self._jitted_by_layout, self.settings, batch, build)

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict[str, float]]:
        arrays = self.place(batch)
        with jax.set_mesh(self.mesh):
            state, metrics = self._jitted(batch)(state, arrays)
        return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

    def place(self, batch: dict) -> dict[str, jax.Array]:
        """The step's inputs from `batch`, laid out on the mesh."""
        if self.settings.use_reference and "ref_logprobs" not in batch:
            raise ValueError("this step computes KL to a reference model: the batch needs ref_logprobs")
        return {k: jax.device_put(v, self._batch_sharding) for k, v in batch.items() if k in BATCH_KEYS}

    def lower(self, state: TrainState, batch: dict):
        """The step lowered for this state and batch: `.compile()` gives the executable and its optimised HLO
        (launch/profile_step.py runs and reads that), called as `compiled(state, self.place(batch))`."""
        with jax.set_mesh(self.mesh):
            return self._jitted(batch).lower(state, self.place(batch))


class LogprobFn:
    """Token log-probs [micro_batches, rows, row_len] of a packed batch under some params (the frozen
    reference for KL, or the policy for inspection), with the same kernel and sharding as the step."""

    def __init__(self, settings: StepSettings, mesh: Mesh, param_shardings: Any):
        self.settings, self.mesh, self.param_shardings = settings, mesh, param_shardings
        self._batch_sharding = batch_sharding(mesh)
        self._jitted_by_layout = {}

    def _jitted(self, batch: dict):
        def build(settings):
            def fn(params, batch):
                return jax.lax.map(lambda mb: token_logprobs(settings, params, mb)[0], batch)

            return jax.jit(fn, in_shardings=(self.param_shardings, self._batch_sharding),
                           out_shardings=self._batch_sharding)

        return _jitted_for(self._jitted_by_layout, self.settings, batch, build)

    def __call__(self, params: Any, batch: dict) -> np.ndarray:
        keys = ("tokens", "targets", "positions", "segment_ids")
        arrays = {k: jax.device_put(batch[k], self._batch_sharding) for k in keys}
        params = jax.device_put(params, self.param_shardings)  # a no-op when already laid out so
        with jax.set_mesh(self.mesh):
            return np.asarray(jax.device_get(self._jitted(batch)(params, arrays)))


def shard_state(state: TrainState, shardings: TrainState) -> TrainState:
    return jax.device_put(state, shardings)


def make_train_step(settings: StepSettings, optimizer: optax.GradientTransformation, mesh: Mesh,
                    params: Any) -> tuple[TrainStep, TrainState]:
    """Build the sharded initial state from `params` and the compiled step over `mesh`.

    The state may share buffers with `params`, and the step donates the state: keep a copy of `params`
    (jnp.copy) if you need them afterwards (e.g. as the KL reference)."""
    with jax.set_mesh(mesh):
        state = init_train_state(settings.model, params, optimizer, settings.algorithm)
        shardings = state_shardings(mesh, settings.model, state, optimizer)
        state = shard_state(state, shardings)
    return TrainStep(settings, optimizer, mesh, shardings), state

