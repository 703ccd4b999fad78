"""`python -m launch.convert_teacher` = `ega-convert` (ega_jax/convert/command.py), from a checkout."""

import sys

from ega_jax.convert.command import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
  sys.exit(main())
