"""`python -m ega_jax.convert` = `ega-convert`."""

import sys

from ega_jax.convert.command import main

sys.exit(main())
