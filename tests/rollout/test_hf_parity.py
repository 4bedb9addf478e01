"""Greedy decoding of the embedded sampler equals transformers' greedy `generate` on the same weights."""

import asyncio
import dataclasses

import jax
import numpy as np
import pytest

from orchestra_jax import models
from orchestra_jax.rollout.engine import GenerateRequest, SamplingParams
from orchestra_jax.rollout.sampler import EmbeddedEngine


@pytest.mark.parametrize("family", ["qwen3", pytest.param("llama", marks=pytest.mark.slow)])
def test_greedy_equals_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng()
    config = dataclasses.replace(models.get_preset(f"{family}-tiny", 256), tie_word_embeddings=False)
    params = models.init_params(config, jax.random.key(int(rng.integers(2**31))))
    params = dict(params, lm_head=params["lm_head"] * 60)  # clear argmax margins: no float-rounding ties
    model_dir = models.save_pretrained(config, params, tmp_path / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    prompts = [tuple(int(t) for t in rng.integers(0, 256, size=n)) for n in (5, 11, 17)]
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    ours = asyncio.run(
        EmbeddedEngine(config, params, max_slots=2, max_context=64).generate(
            [GenerateRequest(p, sp, str(i)) for i, p in enumerate(prompts)]
        )
    )
    for prompt, completion in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        assert completion.output_ids == tuple(out[0, len(prompt) :].tolist())
