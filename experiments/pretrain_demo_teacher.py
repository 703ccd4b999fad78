r"""Pretrains the offline demo teacher: SimCLR on Fashion-MNIST, in PyTorch.

No pretrained weights can be downloaded for the offline demo, so the demo makes
its own teacher the way real teachers are made: self-supervised, in PyTorch,
saved as an ordinary checkpoint that `python -m launch.convert_teacher` then
converts to Flax like any released ResNet.

Backbone: `torchvision.models.resnet18` (torchvision's names, like a real
release) whose `fc` is the SimCLR projection MLP 512-512-128, which the
converter ignores. Data: Fashion-MNIST train images without labels, upscaled to
32x32, 3 channels. Loss: NT-Xent on two batch-wise augmented views. Report: a
linear probe on frozen avgpool features, evaluated on the test set. The SimCLR
pieces are in `experiments.simclr`; tensorflow is never imported here.

Outputs `--output` (a plain `state_dict`, float32 or --save_dtype float16) and
`<output>.json` (preprocessing, steps, the training log with quick probes,
the final probe, its protocol, the file's sha256, seconds); a second run with
the same settings finds both and exits at once ("cached"). Training stops
after exactly --steps steps (never after a wall-clock budget), so one command
gives one teacher on any machine. The defaults (800 steps of 256 over all
60,000 images, 3.4 epochs) took 50 minutes on 2 cores and probe at 85.1 %;
the demo therefore ships that checkpoint (experiments/demo_teacher/, float16,
22 MiB) and reruns this script only with `python -m experiments.demo --retrain`.

Usage:
  python -m experiments.pretrain_demo_teacher \
      --output demo_out/teacher/simclr_resnet18_fmnist.pth
"""

import argparse
import json
import os
import sys
import time

# Before torch loads OpenMP: with its default busy-waiting, torch's threads
# run up to 20x slower when other processes share the cores (CI, a shared
# workstation); passive waiting costs little on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ega_jax.checksums import file_sha256  # noqa: E402
from ega_jax.data import idx  # noqa: E402
from experiments import simclr  # noqa: E402

DEFAULT_DATA_DIR = idx.DEBIAN_FASHION_MNIST_DIR
DEFAULT_OUTPUT = "demo_out/teacher/simclr_resnet18_fmnist.pth"
DEFAULT_STEPS = 800
# Train images the quick probes during training are fitted on.
QUICK_PROBE_TRAIN_EXAMPLES = 5000

# Settings that change the trained weights; the cache must match all of them.
TRAINING_SETTING_NAMES = (
  "steps",
  "num_train_examples",
  "batch_size",
  "lr",
  "weight_decay",
  "temperature",
  "seed",
  "probe_train_examples",
  "probe_test_examples",
  "probe_steps",
  "save_dtype",
)


class ScriptError(Exception):
  """A user mistake; reported as one sentence without a traceback."""


# ---------------------------------------------------------------- data


def load_fashion_mnist(data_dir, split):
  """Returns (images uint8 (N, 28, 28), labels int64 (N,)) of one split."""
  try:
    images, labels = idx.read_fashion_mnist(data_dir, split)
  except FileNotFoundError as error:
    raise ScriptError(f"{error} Pass --data_dir pointing at such a folder.") from None
  except ValueError as error:
    raise ScriptError(str(error)) from None
  # A writable copy: torch warns on (and must not alias) the read-only buffer.
  return images.copy(), labels.astype(np.int64)


# ---------------------------------------------------------------- cache


def metadata_path(output):
  return output + ".json"


def is_cached(output, settings):
  """Whether `output` and its JSON exist and were made with `settings`."""
  if not (os.path.isfile(output) and os.path.isfile(metadata_path(output))):
    return False
  try:
    with open(metadata_path(output)) as f:
      previous = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  previous_settings = previous.get("settings", {})
  if any(previous_settings.get(name) != settings[name] for name in TRAINING_SETTING_NAMES):
    return False
  return True


# ---------------------------------------------------------------- main

PROBE_PROTOCOL = (
  "multinomial logistic regression (L-BFGS, --probe_steps iterations, L2 1e-4) on standardised "
  "frozen avgpool features of the un-augmented images upscaled to 32x32: fitted on "
  "--probe_train_examples train images, scored on --probe_test_examples test images"
)


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog="python -m experiments.pretrain_demo_teacher",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--data_dir", default=DEFAULT_DATA_DIR, help="folder with the Fashion-MNIST *-ubyte.gz files"
  )
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="state_dict .pth to write")
  parser.add_argument(
    "--steps", type=int, default=DEFAULT_STEPS, help="training steps (the only stopping rule)"
  )
  parser.add_argument(
    "--num_train_examples",
    type=int,
    default=60000,
    help="size of the random train subset used for SimCLR",
  )
  parser.add_argument("--batch_size", type=int, default=256, help="images per step (2 views each)")
  parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
  parser.add_argument("--weight_decay", type=float, default=1e-4)
  parser.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument(
    "--device",
    default="cpu",
    help="torch device to train on, e.g. 'cuda' (the demo's default is the CPU)",
  )
  parser.add_argument("--log_every", type=int, default=20, help="steps between progress lines")
  parser.add_argument(
    "--probe_train_examples",
    type=int,
    default=60000,
    help="labelled train images the linear probe is fitted on",
  )
  parser.add_argument(
    "--probe_test_examples",
    type=int,
    default=10000,
    help="test images the probe is scored on (10000 = whole test set)",
  )
  parser.add_argument("--probe_steps", type=int, default=300, help="L-BFGS iterations of the probe")
  parser.add_argument(
    "--probe_every",
    type=int,
    default=0,
    help="steps between quick probes during training (fitted on 5,000 train images; 0 = none)",
  )
  parser.add_argument(
    "--save_dtype",
    choices=("float32", "float16"),
    default="float32",
    help="dtype of the saved floating-point tensors (float16 halves the file; the probe "
    "scores the rounded weights)",
  )
  parser.add_argument(
    "--keep_snapshots",
    action="store_true",
    help="also save <output>.step<N>.pth at every quick probe",
  )
  args = parser.parse_args(argv)
  if not args.output.endswith(".pth"):
    raise ScriptError(f"--output must end in .pth, got {args.output!r}.")
  positive = (
    "num_train_examples",
    "batch_size",
    "lr",
    "temperature",
    "steps",
    "threads",
    "log_every",
    "probe_train_examples",
    "probe_test_examples",
    "probe_steps",
  )
  for name in positive:
    if getattr(args, name) <= 0:
      raise ScriptError(f"--{name} must be positive, got {getattr(args, name)}.")
  for name in ("probe_every", "weight_decay"):
    if getattr(args, name) < 0:
      raise ScriptError(f"--{name} must be >= 0, got {getattr(args, name)}.")
  if args.device.split(":")[0] not in ("cpu", "cuda", "mps"):
    raise ScriptError(f"--device must be 'cpu', 'cuda[:N]' or 'mps', got {args.device!r}.")
  if args.device.startswith("cuda") and not torch.cuda.is_available():
    raise ScriptError(
      f"--device {args.device} was asked for but torch sees no CUDA device; use --device cpu."
    )
  if args.batch_size < 2:
    raise ScriptError(
      f"--batch_size must be at least 2 (NT-Xent needs negatives), got {args.batch_size}."
    )
  if args.num_train_examples < args.batch_size:
    raise ScriptError(
      f"--num_train_examples ({args.num_train_examples}) must be at least "
      f"--batch_size ({args.batch_size}) so an epoch has one full step."
    )
  return args


def run_probe(model, train_images, train_labels, test_images, test_labels, mean, std, args):
  """Linear-probe test accuracy of the frozen avgpool features (see `simclr.linear_probe_accuracy`).

  Args:
    train_images, test_images: uint8 (N, 28, 28); train_labels, test_labels: int64 (N,).
  """
  train_features = simclr.extract_features(model, simclr.to_unit_tensor(train_images), mean, std)
  test_features = simclr.extract_features(model, simclr.to_unit_tensor(test_images), mean, std)
  accuracy = simclr.linear_probe_accuracy(
    train_features,
    torch.from_numpy(train_labels),
    test_features,
    torch.from_numpy(test_labels),
    steps=args.probe_steps,
  )
  model.train()
  return accuracy


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  settings = {name: getattr(args, name) for name in TRAINING_SETTING_NAMES}
  if is_cached(args.output, settings):
    print(f"cached: {args.output} was already trained with these settings")
    return 0

  start = time.time()
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  train_images, train_labels = load_fashion_mnist(args.data_dir, "train")
  test_images, test_labels = load_fashion_mnist(args.data_dir, "test")
  for name, available in (
    ("num_train_examples", len(train_images)),
    ("probe_train_examples", len(train_images)),
    ("probe_test_examples", len(test_images)),
  ):
    if getattr(args, name) > available:
      raise ScriptError(
        f"--{name} is {getattr(args, name)} but the split has only {available} images."
      )
  # The dataset's own statistics, over the whole train split (28x28, [0, 1]).
  mean, std = simclr.dataset_mean_std(train_images)

  rng = np.random.default_rng(args.seed)
  subset = rng.permutation(len(train_images))
  ssl_images = simclr.to_unit_tensor(train_images[subset[: args.num_train_examples]]).to(
    args.device
  )
  print(
    f"SimCLR ResNet-18 on {len(ssl_images)} Fashion-MNIST images, {args.steps} steps, "
    f"batch {args.batch_size}, {args.threads} threads on {args.device}; "
    f"mean {mean:.4f} std {std:.4f}",
    flush=True,
  )

  model = simclr.build_simclr_resnet18().to(args.device, memory_format=torch.channels_last)
  # The probe is fitted on the last `probe_train_examples` of the permutation
  # (labels used by the probe only) and scored on the test split.
  probe_indices = subset[len(subset) - args.probe_train_examples :]
  probe_sets = (
    train_images[probe_indices],
    train_labels[probe_indices],
    test_images[: args.probe_test_examples],
    test_labels[: args.probe_test_examples],
  )
  quick = min(QUICK_PROBE_TRAIN_EXAMPLES, args.probe_train_examples)
  quick_probe = lambda model: run_probe(
    model, probe_sets[0][:quick], probe_sets[1][:quick], *probe_sets[2:], mean, std, args
  )
  train_start = time.time()
  log = simclr.train_simclr(model, ssl_images, mean, std, args, probe=quick_probe)
  train_seconds = time.time() - train_start

  if args.save_dtype == "float16":
    # Round to what the file will hold before the probe, so the recorded
    # accuracy is that of the saved weights.
    with torch.no_grad():
      for tensor in model.state_dict().values():
        if tensor.is_floating_point():
          tensor.copy_(tensor.half().float())
  probe_start = time.time()
  accuracy = run_probe(model, *probe_sets, mean, std, args)
  print(
    f"linear probe: {accuracy:.4f} test accuracy ({args.probe_train_examples} train / "
    f"{args.probe_test_examples} test images, {time.time() - probe_start:.0f}s)",
    flush=True,
  )

  output_dir = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(output_dir, exist_ok=True)
  save_dtype = getattr(torch, args.save_dtype)
  state_dict = {
    key: (value.to(save_dtype) if value.is_floating_point() else value).cpu().contiguous()
    for key, value in model.state_dict().items()
  }
  # The old JSON goes first and both files are written under temporary names,
  # so an interrupted run never leaves a pair a later run would take as cached.
  if os.path.exists(metadata_path(args.output)):
    os.remove(metadata_path(args.output))
  torch.save(state_dict, args.output + ".tmp")
  os.replace(args.output + ".tmp", args.output)
  metadata = {
    "architecture": "torchvision resnet18, fc = SimCLR projection MLP 512-512-128",
    "image_size": simclr.IMAGE_SIZE,
    "mean": [mean] * 3,
    "std": [std] * 3,
    "steps_run": args.steps,
    "epochs_run": args.steps / (len(ssl_images) // args.batch_size),
    "final_loss": log[-1]["loss"],
    "linear_probe_accuracy": accuracy,
    "seconds": time.time() - start,
    "train_seconds": train_seconds,
    "settings": settings,
    "save_dtype": args.save_dtype,
    "sha256": file_sha256(args.output),
    "probe_protocol": PROBE_PROTOCOL,
    "training_log": log,
  }
  with open(metadata_path(args.output) + ".tmp", "w") as f:
    json.dump(metadata, f, indent=2)
  os.replace(metadata_path(args.output) + ".tmp", metadata_path(args.output))
  print(
    f"wrote {args.output} and {metadata_path(args.output)} in {simclr.format_seconds(time.time() - start)}"
  )
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ScriptError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
