"""Measurements of the production step, run from the repository root as modules.

python -m benchmarks.step          the train step's time, FLOPs, MFU (and PyTorch's)
python -m benchmarks.ablations     the input-side speed work, each piece turned off
python -m benchmarks.conv_ablation the convolution rewrites of models/conv.py

timing.py          the one timing helper (interleaved rounds), FLOP counts, the peak matmul
jax_harness.py     the production step over `train.run.build_run`, the teacher alone,
                   the cached step
torch_reference.py the same step in PyTorch, written independently of ega_jax (also the
                   RepDistiller CIFAR ResNet the student tests compare with)
report.py          the numbers derived from the timings, and the table
"""


class BenchmarkError(ValueError):
  """A flag or config value that cannot be benchmarked; reported as one line."""
