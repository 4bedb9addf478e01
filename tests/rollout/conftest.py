"""Shared pieces for the rollout tests: a tiny model with a small tokenizer, and servers on loopback ports."""

import dataclasses

import jax
import numpy as np
import pytest
from rollout_helpers import start_server

from orchestra_jax.models import transformer
from orchestra_jax.models.tokenizer import train_small_tokenizer
from orchestra_jax.models.transformer_config import get_preset

TEXTS = [
    "The orchestrator calls a search tool, then answers the question about the capital of France.",
    '<tool_call>\n{"name": "search", "arguments": {"query": "capital of France"}}\n</tool_call>',
    "Python code runs in a sandbox; the result is 42. Numbers 0 1 2 3 4 5 6 7 8 9 appear often.",
] * 20


@pytest.fixture(scope="session")
def small_tokenizer():
    return train_small_tokenizer(TEXTS, vocab_size=384)


@pytest.fixture(scope="session")
def tiny_model(small_tokenizer):
    config = dataclasses.replace(
        get_preset("qwen3-tiny", small_tokenizer.vocab_size), eos_token_ids=small_tokenizer.eos_token_ids
    )
    params = transformer.init_params(config, jax.random.key(np.random.randint(2**31)))
    return config, dict(params, embed=params["embed"] * 8)


@pytest.fixture(scope="module")
def server(tiny_model, small_tokenizer):
    thread = start_server(*tiny_model, small_tokenizer)
    yield thread
    thread.stop()
