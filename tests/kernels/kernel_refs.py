"""Float64 references and random inputs shared by the kernel tests (torch autograd: independent of JAX)."""

import jax.numpy as jnp
import numpy as np
import torch


def rel_err(out, want) -> float:
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))


def float64_reference(hidden, w, targets, temperature, g_logprob, g_entropy):
    """log-probs, entropies and the gradients of Σ g·logp + Σ g_H·H, by torch autograd in float64."""
    h = torch.tensor(np.asarray(jnp.asarray(hidden, jnp.float32), np.float64), requires_grad=True)
    wt = torch.tensor(np.asarray(jnp.asarray(w, jnp.float32), np.float64), requires_grad=True)
    logp_all = torch.log_softmax(h @ wt / temperature, dim=-1)
    logp = logp_all.gather(1, torch.tensor(np.asarray(targets), dtype=torch.int64)[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss = (logp * torch.tensor(np.asarray(g_logprob, np.float64))).sum()
    loss = loss + (entropy * torch.tensor(np.asarray(g_entropy, np.float64))).sum()
    loss.backward()
    return [x.detach().numpy() for x in (logp, entropy, h.grad, wt.grad)]


def random_case(seed, tokens, hidden, vocab, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(tokens, hidden)) * scale, dtype)
    w = jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden), dtype)
    targets = jnp.asarray(rng.integers(0, vocab, size=tokens), jnp.int32)
    g_lp = jnp.asarray(rng.normal(size=tokens), jnp.float32)
    g_ent = jnp.asarray(rng.normal(size=tokens), jnp.float32)
    return h, w, targets, g_lp, g_ent
