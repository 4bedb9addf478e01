"""Making tokens: the rollout engine interface, the embedded JAX sampler, the SGLang client and our SGLang-compatible server."""
