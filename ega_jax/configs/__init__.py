"""The shipped configs: `--config=ega_jax/configs/NAME.py` or, by name, `--config=NAME`.

In a checkout `configs/` at the repository root is a link to this folder, so
`--config=configs/cifar100.py` works too.
"""
