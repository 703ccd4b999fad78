"""Shared pytest setup.

torch/torchvision are imported first on purpose: importing tensorflow and then
torchvision in one process segfaults on this stack, the reverse order is fine.
"""

import os
import shutil
import sys
import tempfile

# torch's OpenMP threads busy-wait by default, which starves the JAX work on a
# small shared CPU; passive waiting made torch-using tests up to 10x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The entry points' malloc tuning (ega_jax/host_memory.py) pays off over many steps but made
# compile-heavy test runs ~30 % slower (docs/performance.md, "Page faults on every step"):
# test subprocesses keep glibc's defaults; tests/test_host_memory.py clears this itself.
os.environ.setdefault("EGA_JAX_MALLOC_TUNING", "0")

import torch  # noqa: F401  (must precede any tensorflow import)
import torchvision  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def converted_resnet18(tmp_path_factory):
  """A random torchvision ResNet-18 (non-trivial BN statistics) converted by the CLI."""
  root = tmp_path_factory.mktemp("teacher")
  torch.manual_seed(0)
  model = torchvision.models.resnet18()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  checkpoint = root / "resnet18.pth"
  torch.save(model.state_dict(), checkpoint)
  output = root / "flax"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.convert_teacher",
      "--arch",
      "resnet18",
      "--checkpoint",
      str(checkpoint),
      "--output",
      str(output),
      "--image_size",
      "32",
      "--mean",
      "0.286",
      "0.286",
      "0.286",
      "--std",
      "0.353",
      "0.353",
      "0.353",
    ],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return output


# A full disk turns most of this suite into setup errors far from the cause (it
# happened on CI), so say how much room the temporary directory has: in the
# header, and as a warning under -q when it is too little.
_TMP_SPACE_NEEDED_GIB = 2.0


def _tmp_space_line():
  free_gib = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
  line = f"free disk space in {tempfile.gettempdir()}: {free_gib:.1f} GiB"
  if free_gib < _TMP_SPACE_NEEDED_GIB:
    line += (
      f" -- WARNING: the conversion tests write checkpoints of up to 0.7 GB; "
      f"free at least {_TMP_SPACE_NEEDED_GIB:.0f} GiB or set TMPDIR to a larger disk"
    )
  return free_gib, line


def pytest_report_header(config):
  return _tmp_space_line()[1]


def pytest_sessionstart(session):
  free_gib, line = _tmp_space_line()
  if free_gib < _TMP_SPACE_NEEDED_GIB and session.config.get_verbosity() < 0:
    print(line, file=sys.stderr)
