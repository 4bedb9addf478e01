"""orchestra_jax: train small LLM orchestrators of tools and expert models with multi-objective GRPO, in JAX."""

__version__ = "0.1.0"
