"""Shared pytest setup.

torch/torchvision are imported first on purpose: importing tensorflow and then
torchvision in one process segfaults on this stack, the reverse order is fine.
"""
import os
import sys

import torch  # noqa: F401  (must precede any tensorflow import)
import torchvision  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
