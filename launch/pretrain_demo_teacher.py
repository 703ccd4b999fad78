r"""Pretrains the offline demo teacher: SimCLR on Fashion-MNIST, in PyTorch.

No pretrained weights can be downloaded for the offline demo, so the demo makes
its own teacher the way real teachers are made: self-supervised, in PyTorch,
saved as an ordinary checkpoint that `launch/convert_teacher.py` then converts
to Flax like any released ResNet.

  * Backbone: `torchvision.models.resnet18` with torchvision's module names, so
    the checkpoint looks like a real release. Its `fc` is replaced by the SimCLR
    projection MLP `fc = Sequential(Linear(512, 512), ReLU, Linear(512, 128))`;
    the converter ignores `fc.*` and keeps the 512-d avgpool feature.
  * Data: Fashion-MNIST train images (no labels), upscaled to 32x32, grayscale
    replicated to 3 channels, normalised with the dataset's own mean/std.
  * Loss: NT-Xent on two augmented views per image (random resized crop,
    horizontal flip, brightness/contrast jitter, random erasing), all done
    batch-wise on tensors.
  * Report: a linear probe (logistic regression on frozen avgpool features of a
    few thousand train images, evaluated on the test set) measures what the
    teacher learned without labels.

Outputs `--output` (a plain `state_dict`) and `<output>.json` (preprocessing,
epochs run, final loss, probe accuracy, seconds). A second run with the same
settings finds both and exits at once ("cached").

Budget: the defaults (20k images x 5 epochs, batch 256, NT-Xent temperature
0.2) are sized for about 3 minutes on 2 idle CPU cores. `--time_budget_s`
(225 s) bounds the whole run: on a slower or busy machine training stops early,
leaving the probe the time it needs, and the JSON says so (`stopped_early`).

This file imports neither tensorflow nor jax (torch must not share a process
with tensorflow imported first).

Usage:
  python launch/pretrain_demo_teacher.py --output demo_out/teacher/simclr_resnet18_fmnist.pth
"""
import argparse
import gzip
import json
import math
import os
import sys
import time

# Before torch loads OpenMP: with its default busy-waiting, torch's threads
# run up to 20x slower when other processes share the cores (CI, a shared
# workstation); passive waiting costs little on an idle machine.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

DEFAULT_DATA_DIR = '/usr/share/datasets/fashion-mnist'
DEFAULT_OUTPUT = 'demo_out/teacher/simclr_resnet18_fmnist.pth'
IMAGE_SIZE = 32
PROJECTION_DIM = 128
BACKBONE_FEATURE_DIM = 512
# Seconds kept for the probe's L-BFGS fit and the checkpoint writes.
PROBE_FIT_RESERVE_S = 10.0
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# The idx format's magic numbers: 0x08 (unsigned byte) data with 3 / 1 dims.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

# Settings that change the trained weights; the cache must match all of them.
TRAINING_SETTING_NAMES = (
    'epochs', 'num_train_examples', 'batch_size', 'lr', 'weight_decay',
    'temperature', 'seed', 'probe_train_examples', 'probe_test_examples',
    'probe_steps')


class ScriptError(Exception):
  """A user mistake; reported as one sentence without a traceback."""


# ---------------------------------------------------------------- data


def read_idx(path, expected_magic):
  """Reads one gzip-compressed idx file.

  Args:
    path: a `*-ubyte.gz` file.
    expected_magic: `IDX_IMAGES_MAGIC` or `IDX_LABELS_MAGIC`.

  Returns:
    uint8 array: (N, rows, cols) for images, (N,) for labels.
  """
  if not os.path.isfile(path):
    raise ScriptError(
        f'Fashion-MNIST file {path} does not exist; pass --data_dir pointing at '
        f'a folder holding {sorted(f for p in FASHION_MNIST_FILES.values() for f in p)}.')
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  magic = int.from_bytes(raw[0:4], 'big')
  if magic != expected_magic:
    raise ScriptError(
        f'{path} is not an idx file of the expected kind: magic number '
        f'{magic:#010x}, expected {expected_magic:#010x}.')
  num_dims = magic & 0xFF
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(num_dims)]
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * num_dims)
  if data.size != math.prod(dims):
    raise ScriptError(f'{path} is truncated: header says {dims}, found {data.size} bytes.')
  # A writable copy: torch warns on (and must not alias) the read-only buffer.
  return data.reshape(dims).copy()


def load_fashion_mnist(data_dir, split):
  """Returns (images uint8 (N, 28, 28), labels int64 (N,)) of one split."""
  image_file, label_file = FASHION_MNIST_FILES[split]
  images = read_idx(os.path.join(data_dir, image_file), IDX_IMAGES_MAGIC)
  labels = read_idx(os.path.join(data_dir, label_file), IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise ScriptError(
        f'Fashion-MNIST {split} split in {data_dir} has {len(images)} images '
        f'but {len(labels)} labels.')
  return images, labels.astype(np.int64)


def dataset_mean_std(images):
  """Pixel mean and std in [0, 1] of uint8 images (N, H, W), as Python floats."""
  # From the 256-bin histogram: exact, and no float copy of the whole split.
  counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
  levels = np.arange(256) / 255.0
  mean = counts @ levels / counts.sum()
  variance = counts @ (levels - mean) ** 2 / counts.sum()
  return float(mean), float(math.sqrt(variance))


def to_unit_tensor(images, image_size=IMAGE_SIZE):
  """uint8 (N, 28, 28) -> float32 (N, 1, image_size, image_size) in [0, 1].

  Upscaled once, bilinearly, so the per-step augmentation works at the final
  resolution. One channel is kept until `normalize_to_rgb` to save work.
  """
  unit = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
  resized = F.interpolate(unit, size=(image_size, image_size), mode='bilinear',
                          align_corners=False)
  return resized.clamp_(0.0, 1.0)


def normalize_to_rgb(unit_images, mean, std):
  """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) normalised, channels_last."""
  normalized = (unit_images - mean) / std
  return normalized.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- augmentation


def random_resized_crop_and_flip(images, generator, scale=(0.3, 1.0),
                                 log_ratio=(math.log(3 / 4), math.log(4 / 3))):
  """Per-image random resized crop + horizontal flip, as one batched resample.

  Each crop is an axis-aligned affine map of the output grid into the input
  (`affine_grid` coordinates in [-1, 1]), so the whole batch is one
  `grid_sample` call instead of a Python loop of crops.

  Args:
    images: (B, C, H, W) float.
    generator: torch.Generator for the random draws.
    scale: range of the crop's area as a fraction of the image.
    log_ratio: range of log(width / height) of the crop.

  Returns:
    (B, C, H, W) float, the crops resized back to H x W (bilinear).
  """
  batch = images.shape[0]
  uniform = lambda low, high: low + (high - low) * torch.rand(batch, generator=generator)
  area = uniform(*scale)
  ratio = torch.exp(uniform(*log_ratio))
  # Crop side lengths as fractions of the image side; clipped so the crop fits.
  width = torch.sqrt(area * ratio).clamp(max=1.0)
  height = torch.sqrt(area / ratio).clamp(max=1.0)
  # Centre anywhere that keeps the crop inside the image ([-1, 1] coordinates).
  centre_x = (1.0 - width) * (2.0 * torch.rand(batch, generator=generator) - 1.0)
  centre_y = (1.0 - height) * (2.0 * torch.rand(batch, generator=generator) - 1.0)
  flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
  theta = torch.zeros(batch, 2, 3)
  theta[:, 0, 0] = width * flip
  theta[:, 0, 2] = centre_x
  theta[:, 1, 1] = height
  theta[:, 1, 2] = centre_y
  grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
  return F.grid_sample(images, grid, mode='bilinear', padding_mode='border',
                       align_corners=False)


def brightness_contrast_jitter(images, generator, strength=0.4):
  """Per-image brightness and contrast factors in [1 - strength, 1 + strength].

  Args:
    images: (B, C, H, W) in [0, 1].

  Returns:
    (B, C, H, W) in [0, 1].
  """
  batch = images.shape[0]
  factor = lambda: (1.0 + strength * (
      2.0 * torch.rand(batch, 1, 1, 1, generator=generator) - 1.0)).to(images.device)
  brightened = images * factor()
  image_mean = brightened.mean(dim=(1, 2, 3), keepdim=True)
  contrasted = image_mean + (brightened - image_mean) * factor()
  return contrasted.clamp(0.0, 1.0)


def random_erasing(images, generator, probability=0.25, scale=(0.02, 0.2)):
  """Zeroes one random rectangle in a random subset of the images.

  Args:
    images: (B, C, H, W).
    probability: chance that an image gets a rectangle.
    scale: range of the rectangle's area as a fraction of the image.

  Returns:
    (B, C, H, W).
  """
  batch, _, height, width = images.shape
  area = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, generator=generator)
  ratio = torch.exp(math.log(0.3) * (2.0 * torch.rand(batch, generator=generator) - 1.0))
  box_h = (torch.sqrt(area / ratio) * height).clamp(1, height).long()
  box_w = (torch.sqrt(area * ratio) * width).clamp(1, width).long()
  top = (torch.rand(batch, generator=generator) * (height - box_h + 1)).long()
  left = (torch.rand(batch, generator=generator) * (width - box_w + 1)).long()
  erase = torch.rand(batch, generator=generator) < probability
  top, left, box_h, box_w, erase = (t.to(images.device) for t in (top, left, box_h, box_w, erase))
  rows = torch.arange(height, device=images.device).view(1, height, 1)
  cols = torch.arange(width, device=images.device).view(1, 1, width)
  inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1)) & (cols < (left + box_w).view(-1, 1, 1)))
  mask = (inside & erase.view(-1, 1, 1)).unsqueeze(1)
  return images.masked_fill(mask, 0.0)


def augment(unit_images, generator):
  """One SimCLR view of each image: (B, 1, H, W) in [0, 1] -> same shape."""
  view = random_resized_crop_and_flip(unit_images, generator)
  view = brightness_contrast_jitter(view, generator)
  return random_erasing(view, generator)


# ---------------------------------------------------------------- model and loss


def build_simclr_resnet18():
  """torchvision ResNet-18 with the SimCLR projection MLP in place of `fc`.

  The state_dict keys are torchvision's resnet18 keys with `fc.weight/bias`
  replaced by `fc.0.*` and `fc.2.*` (the projection head).
  """
  model = torchvision.models.resnet18(num_classes=PROJECTION_DIM)
  model.fc = nn.Sequential(
      nn.Linear(BACKBONE_FEATURE_DIM, BACKBONE_FEATURE_DIM),
      nn.ReLU(inplace=True),
      nn.Linear(BACKBONE_FEATURE_DIM, PROJECTION_DIM))
  return model


def backbone_features(model, images):
  """The 512-d avgpool output of a torchvision ResNet: (B, 3, H, W) -> (B, 512)."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
  x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
  return torch.flatten(model.avgpool(x), 1)


def nt_xent_loss(projections_a, projections_b, temperature):
  """NT-Xent (normalised temperature-scaled cross entropy) of SimCLR.

  Row i of `projections_a` and row i of `projections_b` are the two views of
  image i. Each of the 2B views is classified against the other 2B - 1 views
  by cosine similarity / temperature, the other view of its image being the
  correct class; the loss is the mean cross entropy over all 2B views.

  Args:
    projections_a: (B, D) projections of the first views.
    projections_b: (B, D) projections of the second views.
    temperature: softmax temperature (> 0).

  Returns:
    Scalar loss.
  """
  batch = projections_a.shape[0]
  embeddings = F.normalize(torch.cat([projections_a, projections_b]), dim=1)
  logits = embeddings @ embeddings.T / temperature
  # A view is never its own candidate.
  self_mask = torch.eye(2 * batch, dtype=torch.bool, device=logits.device)
  logits = logits.masked_fill(self_mask, float('-inf'))
  positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)])
  return F.cross_entropy(logits, positives.to(logits.device))


# ---------------------------------------------------------------- linear probe


@torch.no_grad()
def extract_features(model, unit_images, mean, std, batch_size=500):
  """Frozen (eval-mode) avgpool features: (N, 1, H, W) in [0, 1] -> (N, 512) on the CPU."""
  model.eval()
  device = next(model.parameters()).device
  features = [backbone_features(model, normalize_to_rgb(unit_images[i:i + batch_size].to(device),
                                                        mean, std)).cpu()
              for i in range(0, len(unit_images), batch_size)]
  return torch.cat(features)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels,
                          num_classes=10, steps=300, weight_decay=1e-4):
  """Test accuracy of logistic regression on frozen features.

  Features are standardised with the train statistics, then a linear softmax
  classifier is fitted by full-batch L-BFGS on the train features.

  Args:
    train_features: (N_train, D); train_labels: (N_train,) int64.
    test_features: (N_test, D); test_labels: (N_test,) int64.
    steps: L-BFGS iterations.
    weight_decay: L2 penalty on the weights (keeps separable data bounded).

  Returns:
    Accuracy in [0, 1] as a Python float.
  """
  mean = train_features.mean(0, keepdim=True)
  std = train_features.std(0, keepdim=True) + 1e-6
  train_x = ((train_features - mean) / std).double()
  test_x = ((test_features - mean) / std).double()
  classifier = nn.Linear(train_x.shape[1], num_classes).double()
  optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=steps,
                                history_size=20, line_search_fn='strong_wolfe')

  def closure():
    optimizer.zero_grad()
    loss = (F.cross_entropy(classifier(train_x), train_labels)
            + weight_decay * classifier.weight.pow(2).sum())
    loss.backward()
    return loss

  with torch.enable_grad():
    optimizer.step(closure)
  with torch.no_grad():
    predictions = classifier(test_x).argmax(1)
  return float((predictions == test_labels).double().mean())


# ---------------------------------------------------------------- cache


def metadata_path(output):
  return output + '.json'


def is_cached(output, settings):
  """Whether `output` and its JSON exist and were made with `settings`.

  A run cut short by --time_budget_s only counts for the same budget; a run
  that finished all its epochs counts whatever the budget.
  """
  if not (os.path.isfile(output) and os.path.isfile(metadata_path(output))):
    return False
  try:
    with open(metadata_path(output)) as f:
      previous = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  previous_settings = previous.get('settings', {})
  if any(previous_settings.get(name) != settings[name] for name in TRAINING_SETTING_NAMES):
    return False
  return (not previous.get('stopped_early', True)
          or previous_settings.get('time_budget_s') == settings['time_budget_s'])


# ---------------------------------------------------------------- main


def format_seconds(seconds):
  return f'{int(seconds) // 60}m{int(seconds) % 60:02d}s'


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--data_dir', default=DEFAULT_DATA_DIR,
                      help='folder with the Fashion-MNIST *-ubyte.gz files')
  parser.add_argument('--output', default=DEFAULT_OUTPUT, help='state_dict .pth to write')
  parser.add_argument('--epochs', type=int, default=5, help='passes over the subset')
  parser.add_argument('--num_train_examples', type=int, default=20000,
                      help='size of the random train subset used for SimCLR')
  parser.add_argument('--batch_size', type=int, default=256, help='images per step (2 views each)')
  parser.add_argument('--lr', type=float, default=2e-3, help='peak AdamW learning rate')
  parser.add_argument('--weight_decay', type=float, default=1e-4)
  parser.add_argument('--temperature', type=float, default=0.2, help='NT-Xent temperature')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--time_budget_s', type=float, default=225.0,
                      help='wall-clock budget of the whole run, probe included (imports '
                           'aside): training stops early to leave the probe its time')
  parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
  parser.add_argument('--device', default='cpu',
                      help="torch device to train on, e.g. 'cuda' (the demo's default is the CPU)")
  parser.add_argument('--log_every', type=int, default=20, help='steps between progress lines')
  parser.add_argument('--probe_train_examples', type=int, default=5000,
                      help='labelled train images the linear probe is fitted on')
  parser.add_argument('--probe_test_examples', type=int, default=10000,
                      help='test images the probe is scored on (10000 = whole test set)')
  parser.add_argument('--probe_steps', type=int, default=300, help='L-BFGS iterations of the probe')
  args = parser.parse_args(argv)
  if not args.output.endswith('.pth'):
    raise ScriptError(f'--output must end in .pth, got {args.output!r}.')
  positive = ('num_train_examples', 'batch_size', 'lr', 'temperature', 'time_budget_s',
              'threads', 'log_every', 'probe_train_examples', 'probe_test_examples',
              'probe_steps')
  for name in positive:
    if getattr(args, name) <= 0:
      raise ScriptError(f'--{name} must be positive, got {getattr(args, name)}.')
  for name in ('epochs', 'weight_decay'):
    if getattr(args, name) < 0:
      raise ScriptError(f'--{name} must be >= 0, got {getattr(args, name)}.')
  if args.device.split(':')[0] not in ('cpu', 'cuda', 'mps'):
    raise ScriptError(f"--device must be 'cpu', 'cuda[:N]' or 'mps', got {args.device!r}.")
  if args.device.startswith('cuda') and not torch.cuda.is_available():
    raise ScriptError(f'--device {args.device} was asked for but torch sees no CUDA device; '
                      'use --device cpu.')
  if args.batch_size < 2:
    raise ScriptError(
        f'--batch_size must be at least 2 (NT-Xent needs negatives), got {args.batch_size}.')
  if args.num_train_examples < args.batch_size:
    raise ScriptError(
        f'--num_train_examples ({args.num_train_examples}) must be at least '
        f'--batch_size ({args.batch_size}) so an epoch has one full step.')
  return args


def train_simclr(model, unit_images, mean, std, args, deadline, probe_images):
  """Trains `model` in place with NT-Xent; returns (steps_run, final_loss, stopped_early).

  Args:
    model: from `build_simclr_resnet18`, on args.device.
    unit_images: (N, 1, 32, 32) in [0, 1], the unlabelled training subset.
    mean, std: the normalisation (floats).
    args: the parsed flags.
    deadline: time.time() by which the whole run, probe included, must end.
    probe_images: how many images the linear probe will embed afterwards.

  Returns:
    steps_run; final_loss, the last step's loss (None when no step ran:
    --epochs 0, a random-init baseline); stopped_early, whether the deadline
    cut training short.
  """
  generator = torch.Generator().manual_seed(args.seed)
  steps_per_epoch = len(unit_images) // args.batch_size  # Last partial batch dropped.
  total_steps = steps_per_epoch * args.epochs
  warmup_steps = max(1, min(total_steps // 10, 100))
  optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
  # Linear warmup, then cosine decay to zero.
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: min((step + 1) / warmup_steps,
                                  0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))))
  model.train()
  step, final_loss, stopped_early = 0, None, False
  start = time.time()
  window_start, window_loss, window_steps = start, 0.0, 0
  for epoch in range(args.epochs):
    order = torch.randperm(len(unit_images), generator=generator)
    for batch_start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
      batch = unit_images[order[batch_start:batch_start + args.batch_size]]
      # Both views go through one forward pass: half the Python overhead, and
      # BatchNorm sees the same statistics for both views.
      views = normalize_to_rgb(
          torch.cat([augment(batch, generator), augment(batch, generator)]), mean, std)
      projections = model(views)
      loss = nt_xent_loss(projections[:len(batch)], projections[len(batch):], args.temperature)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      schedule.step()
      step += 1
      final_loss = loss.item()
      window_loss += final_loss
      window_steps += 1
      now = time.time()
      elapsed = now - start
      if step % args.log_every == 0 or step == total_steps:
        images_per_s = window_steps * args.batch_size / (time.time() - window_start)
        eta = (total_steps - step) * elapsed / step
        print(f'epoch {epoch + 1}/{args.epochs} step {step}/{total_steps} '
              f'loss {window_loss / window_steps:.4f} {images_per_s:.0f} images/s '
              f'(2 views each) elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}',
              flush=True)
        window_start, window_loss, window_steps = time.time(), 0.0, 0
      # Time the probe will need: one forward pass over its images (about a
      # third of a training view's work) at the speed measured so far, with
      # 50% headroom, plus the L-BFGS fit and the writes.
      views_per_s = 2 * step * args.batch_size / elapsed
      probe_reserve_s = 1.5 * probe_images / (3 * views_per_s) + PROBE_FIT_RESERVE_S
      if now + probe_reserve_s > deadline and step < total_steps:
        print(f'time budget of {args.time_budget_s:.0f}s: stopping after step '
              f'{step}/{total_steps} to leave {probe_reserve_s:.0f}s for the probe', flush=True)
        stopped_early = True
        return step, final_loss, stopped_early
  return step, final_loss, stopped_early


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  settings = {name: getattr(args, name) for name in TRAINING_SETTING_NAMES}
  settings['time_budget_s'] = args.time_budget_s
  if is_cached(args.output, settings):
    print(f'cached: {args.output} was already trained with these settings')
    return 0

  start = time.time()
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  train_images, train_labels = load_fashion_mnist(args.data_dir, 'train')
  test_images, test_labels = load_fashion_mnist(args.data_dir, 'test')
  for name, available in (('num_train_examples', len(train_images)),
                          ('probe_train_examples', len(train_images)),
                          ('probe_test_examples', len(test_images))):
    if getattr(args, name) > available:
      raise ScriptError(
          f'--{name} is {getattr(args, name)} but the split has only {available} images.')
  # The dataset's own statistics, over the whole train split (28x28, [0, 1]).
  mean, std = dataset_mean_std(train_images)

  rng = np.random.default_rng(args.seed)
  subset = rng.permutation(len(train_images))
  ssl_images = to_unit_tensor(train_images[subset[:args.num_train_examples]]).to(args.device)
  print(f'SimCLR ResNet-18 on {len(ssl_images)} Fashion-MNIST images, {args.epochs} epochs, '
        f'batch {args.batch_size}, {args.threads} threads on {args.device}; '
        f'mean {mean:.4f} std {std:.4f}', flush=True)

  model = build_simclr_resnet18().to(args.device, memory_format=torch.channels_last)
  train_start = time.time()
  steps_run, final_loss, stopped_early = train_simclr(
      model, ssl_images, mean, std, args, deadline=start + args.time_budget_s,
      probe_images=args.probe_train_examples + args.probe_test_examples)
  train_seconds = time.time() - train_start
  steps_per_epoch = len(ssl_images) // args.batch_size
  epochs_run = steps_run / steps_per_epoch

  probe_start = time.time()
  probe_indices = subset[len(subset) - args.probe_train_examples:]
  probe_train = extract_features(model, to_unit_tensor(train_images[probe_indices]), mean, std)
  probe_test = extract_features(
      model, to_unit_tensor(test_images[:args.probe_test_examples]), mean, std)
  accuracy = linear_probe_accuracy(
      probe_train, torch.from_numpy(train_labels[probe_indices]),
      probe_test, torch.from_numpy(test_labels[:args.probe_test_examples]),
      steps=args.probe_steps)
  print(f'linear probe: {accuracy:.4f} test accuracy ({args.probe_train_examples} train / '
        f'{args.probe_test_examples} test images, {time.time() - probe_start:.0f}s)', flush=True)

  output_dir = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(output_dir, exist_ok=True)
  state_dict = {key: value.cpu().contiguous() for key, value in model.state_dict().items()}
  # The old JSON goes first and both files are written under temporary names,
  # so an interrupted run never leaves a pair a later run would take as cached.
  if os.path.exists(metadata_path(args.output)):
    os.remove(metadata_path(args.output))
  torch.save(state_dict, args.output + '.tmp')
  os.replace(args.output + '.tmp', args.output)
  metadata = {
      'architecture': 'torchvision resnet18, fc = SimCLR projection MLP 512-512-128',
      'image_size': IMAGE_SIZE,
      'mean': [mean] * 3,
      'std': [std] * 3,
      'epochs_run': epochs_run,
      'steps_run': steps_run,
      'stopped_early': stopped_early,
      'final_loss': final_loss,
      'linear_probe_accuracy': accuracy,
      'seconds': time.time() - start,
      'train_seconds': train_seconds,
      'settings': settings,
  }
  with open(metadata_path(args.output) + '.tmp', 'w') as f:
    json.dump(metadata, f, indent=2)
  os.replace(metadata_path(args.output) + '.tmp', metadata_path(args.output))
  print(f'wrote {args.output} and {metadata_path(args.output)} '
        f'in {format_seconds(time.time() - start)}')
  return 0


if __name__ == '__main__':
  try:
    sys.exit(main())
  except ScriptError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
