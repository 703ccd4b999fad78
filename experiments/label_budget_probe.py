r"""How many labels does the teacher's knowledge matter for? A linear probe on a label budget.

For each number of labels per class and each seed, the labelled training images
are exactly those a run with `--config.dataset.num_labelled=10*k
--config.seed=SEED` knows (`ega_jax.data.labelled.choose_labelled`). On them it
fits two logistic regressions (`experiments.simclr.linear_probe_accuracy`:
standardised inputs, full-batch L-BFGS from the zero classifier, L2 penalty)
and scores both on the 10,000 Fashion-MNIST test images:

  teacher: the frozen teacher's embeddings, read from a teacher-embedding cache
           (train: the cache's first crop/flip view of each image; test: the
           unaugmented image);
  pixels:  the raw 28x28 pixels in [0, 1].

Where the teacher's features beat the pixels, the teacher knows something the
labels alone do not teach a linear model: that is the regime in which
distilling it can pay (docs/ega_study.md, "How many labels").

  python -m experiments.label_budget_probe --cache=demo_out/teacher/cache \
      [--labels_per_class=1,3,5,10,30] [--seeds=0,1,2] [--json=probe.json]
"""

import argparse
import json
import os
import sys

# torch before anything that may import tensorflow (see tests/conftest.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ega_jax.data import idx  # noqa: E402
from ega_jax.data import labelled as labelled_lib  # noqa: E402
from ega_jax.data import teacher_cache  # noqa: E402
from experiments import simclr  # noqa: E402

NUM_CLASSES = 10


def probe_table(
  inputs: dict[str, tuple[np.ndarray, np.ndarray]],
  train_labels: np.ndarray,
  test_labels: np.ndarray,
  labels_per_class: list[int],
  seeds: list[int],
  weight_decay: float = 1e-2,
) -> list[dict]:
  """Test accuracy (%) of a logistic regression per input kind, label budget and seed.

  Args:
    inputs: name -> (train (N, D) float, test (M, D) float) for every train/test image.
    train_labels: (N,) int; test_labels: (M,) int.
    labels_per_class: budgets k; each uses 10*k labels chosen as a run's would be.
    seeds: config.seed values (each draws its own labelled images).

  Returns:
    One row per k: {"labels_per_class", "num_labelled", name: [accuracy per seed], ...}.
  """
  # The test sets are the same for every budget and seed: convert them once.
  test_tensors = {
    name: torch.as_tensor(test, dtype=torch.float32) for name, (_, test) in inputs.items()
  }
  test_label_tensor = torch.as_tensor(test_labels, dtype=torch.int64)
  rows = []
  for per_class in labels_per_class:
    row = {"labels_per_class": per_class, "num_labelled": per_class * NUM_CLASSES}
    for name in inputs:
      row[name] = []
    for seed in seeds:
      chosen = labelled_lib.choose_labelled(
        train_labels, per_class * NUM_CLASSES, seed, NUM_CLASSES
      )
      for name, (train, _) in inputs.items():
        accuracy = simclr.linear_probe_accuracy(
          torch.as_tensor(train[chosen], dtype=torch.float32),
          torch.as_tensor(train_labels[chosen], dtype=torch.int64),
          test_tensors[name],
          test_label_tensor,
          num_classes=NUM_CLASSES,
          weight_decay=weight_decay,
          zero_init=True,  # the same numbers on every call
        )
        row[name].append(round(100 * accuracy, 2))
    rows.append(row)
  return rows


def format_table(rows: list[dict], names: list[str]) -> str:
  """A Markdown table: per budget, each input's per-seed accuracies and mean, and the gap."""
  header = "| labels per class | " + " | ".join(f"{n}: per seed (mean)" for n in names)
  header += f" | {names[0]} − {names[1]} |" if len(names) == 2 else " |"
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for row in rows:
    cells = [str(row["labels_per_class"])]
    means = []
    for name in names:
      means.append(float(np.mean(row[name])))
      cells.append(" / ".join(f"{a:.1f}" for a in row[name]) + f" ({means[-1]:.1f})")
    if len(names) == 2:
      cells.append(f"{means[0] - means[1]:+.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def int_list(minimum: int):
  """An argparse type: comma-separated integers, each >= minimum."""

  def parse(text: str) -> list[int]:
    try:
      values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
      values = []
    if not values or min(values) < minimum:
      raise argparse.ArgumentTypeError(
        f"expected comma-separated integers >= {minimum}, like {minimum},{minimum + 2}; got {text!r}"
      )
    return values

  return parse


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m experiments.label_budget_probe", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--cache", required=True, help="teacher-embedding cache (ega-cache)")
  parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--labels_per_class", type=int_list(1), default=[1, 3, 5, 10, 30])
  parser.add_argument("--seeds", type=int_list(0), default=[0, 1, 2])
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args(argv)

  try:
    train_images, train_labels = idx.read_fashion_mnist(args.data_dir, "train")
    test_images, test_labels = idx.read_fashion_mnist(args.data_dir, "test")
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: --data_dir: {error}")
  if not os.path.exists(os.path.join(args.cache, teacher_cache.MANIFEST_FILE)):
    sys.exit(
      f"error: --cache={args.cache} holds no {teacher_cache.MANIFEST_FILE}; build it with ega-cache."
    )
  train_features = np.asarray(teacher_cache.open_features(args.cache, "train")[:, 0], np.float32)
  test_features = np.asarray(teacher_cache.open_features(args.cache, "eval")[:, 0], np.float32)
  if len(train_features) != len(train_images) or len(test_features) != len(test_images):
    sys.exit(
      f"error: --cache={args.cache} has {len(train_features)} train / {len(test_features)} "
      f"test rows, but Fashion-MNIST has {len(train_images)} / {len(test_images)}."
    )
  inputs = {
    "teacher": (train_features, test_features),
    "pixels": (
      train_images.reshape(len(train_images), -1) / np.float32(255),
      test_images.reshape(len(test_images), -1) / np.float32(255),
    ),
  }
  rows = probe_table(
    inputs,
    train_labels.astype(np.int64),
    test_labels.astype(np.int64),
    args.labels_per_class,
    args.seeds,
  )
  print(format_table(rows, list(inputs)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"seeds": args.seeds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
