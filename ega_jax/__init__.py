"""ega_jax: Embedding Graph Alignment (EGA) knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"
