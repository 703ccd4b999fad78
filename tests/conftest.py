"""Shared pytest setup.

torch/torchvision are imported first on purpose: importing tensorflow and then
torchvision in one process segfaults on this stack, the reverse order is fine.
"""
import os
import sys

# torch's OpenMP threads busy-wait by default, which starves the JAX work on a
# small shared CPU; passive waiting made torch-using tests up to 10x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: F401  (must precede any tensorflow import)
import torchvision  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


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
      [sys.executable, os.path.join(REPO_ROOT, "launch", "convert_teacher.py"), "--arch", "resnet18",
       "--checkpoint", str(checkpoint), "--output", str(output), "--image_size", "32",
       "--mean", "0.286", "0.286", "0.286", "--std", "0.353", "0.353", "0.353"],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return output


