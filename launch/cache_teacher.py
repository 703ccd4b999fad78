"""`python -m launch.cache_teacher` = `ega-cache` (ega_jax/cache_teacher.py), from a checkout."""

from ega_jax.cache_teacher import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
  run()
