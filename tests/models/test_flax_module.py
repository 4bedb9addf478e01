"""The Flax face shares the functional decoder's params tree and outputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from orchestra_jax.models import forward, get_preset, hidden_states, init_params
from orchestra_jax.models.flax_module import TransformerLM


def test_flax_init_and_apply_match_the_functions():
    rng = np.random.default_rng()
    config = dataclasses.replace(get_preset("qwen3-tiny"), vocab_size=97, num_layers=2)
    tokens = jnp.asarray(rng.integers(0, 97, size=(2, 7)), jnp.int32)
    model = TransformerLM(config)

    variables = model.init(jax.random.key(int(rng.integers(2**31))), tokens)
    reference = init_params(config, jax.random.key(0))
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(reference)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, reference)

    logits = model.apply({"params": reference}, tokens)
    np.testing.assert_allclose(logits, forward(config, reference, tokens), rtol=1e-6, atol=1e-6)
    hidden, _ = model.apply({"params": reference}, tokens, return_hidden=True)
    np.testing.assert_allclose(hidden, hidden_states(config, reference, tokens)[0], rtol=1e-6, atol=1e-6)
