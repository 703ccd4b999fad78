"""SimCLR for the demo teacher, in PyTorch: image preparation, augmentations,
the ResNet-18 with its projection MLP, the NT-Xent loss, the linear probe and
the training loop.

Functions of tensors; the augmentations draw from a `torch.Generator` they
are given, so a seed fixes every view. The command line, the probe sets and
the cache are in `experiments.pretrain_demo_teacher`. Images are (B, C, H, W)
float tensors; augmentations work batch-wise.
"""

import math
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torchvision

IMAGE_SIZE = 32
PROJECTION_DIM = 128
BACKBONE_FEATURE_DIM = 512


# ---------------------------------------------------------------- images


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
  resized = F.interpolate(unit, size=(image_size, image_size), mode="bilinear", align_corners=False)
  return resized.clamp_(0.0, 1.0)


def normalize_to_rgb(unit_images, mean, std):
  """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) normalised, channels_last."""
  normalized = (unit_images - mean) / std
  return normalized.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- augmentation


def random_resized_crop_and_flip(
  images, generator, scale=(0.3, 1.0), log_ratio=(math.log(3 / 4), math.log(4 / 3))
):
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
  return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def brightness_contrast_jitter(images, generator, strength=0.4):
  """Per-image brightness and contrast factors in [1 - strength, 1 + strength].

  Args:
    images: (B, C, H, W) in [0, 1].

  Returns:
    (B, C, H, W) in [0, 1].
  """
  batch = images.shape[0]
  factor = lambda: (
    1.0 + strength * (2.0 * torch.rand(batch, 1, 1, 1, generator=generator) - 1.0)
  ).to(images.device)
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
  inside = (
    (rows >= top.view(-1, 1, 1))
    & (rows < (top + box_h).view(-1, 1, 1))
    & (cols >= left.view(-1, 1, 1))
    & (cols < (left + box_w).view(-1, 1, 1))
  )
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
    nn.Linear(BACKBONE_FEATURE_DIM, PROJECTION_DIM),
  )
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
  logits = logits.masked_fill(self_mask, float("-inf"))
  positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)])
  return F.cross_entropy(logits, positives.to(logits.device))


# ---------------------------------------------------------------- linear probe


@torch.no_grad()
def extract_features(model, unit_images, mean, std, batch_size=500):
  """Frozen (eval-mode) avgpool features: (N, 1, H, W) in [0, 1] -> (N, 512) on the CPU."""
  model.eval()
  device = next(model.parameters()).device
  features = [
    backbone_features(
      model, normalize_to_rgb(unit_images[i : i + batch_size].to(device), mean, std)
    ).cpu()
    for i in range(0, len(unit_images), batch_size)
  ]
  return torch.cat(features)


def linear_probe_accuracy(
  train_features,
  train_labels,
  test_features,
  test_labels,
  num_classes=10,
  steps=300,
  weight_decay=1e-4,
  zero_init=False,
):
  """Test accuracy of logistic regression on frozen features.

  Features are standardised with the train statistics, then a linear softmax
  classifier is fitted by full-batch L-BFGS on the train features.

  Args:
    train_features: (N_train, D); train_labels: (N_train,) int64.
    test_features: (N_test, D); test_labels: (N_test,) int64.
    steps: L-BFGS iterations.
    weight_decay: L2 penalty on the weights (keeps separable data bounded).
    zero_init: start L-BFGS from the zero classifier instead of nn.Linear's
      random init. The penalised problem is strictly convex, so this makes the
      answer independent of torch's global RNG (L-BFGS stops before it has
      fully converged, and from a random start the accuracy moved by up to
      0.5 points from one call to the next).

  Returns:
    Accuracy in [0, 1] as a Python float.
  """
  mean = train_features.mean(0, keepdim=True)
  std = train_features.std(0, keepdim=True) + 1e-6
  train_x = ((train_features - mean) / std).double()
  test_x = ((test_features - mean) / std).double()
  classifier = nn.Linear(train_x.shape[1], num_classes).double()
  if zero_init:
    with torch.no_grad():
      classifier.weight.zero_()
      classifier.bias.zero_()
  optimizer = torch.optim.LBFGS(
    classifier.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
  )

  def closure():
    optimizer.zero_grad()
    loss = (
      F.cross_entropy(classifier(train_x), train_labels)
      + weight_decay * classifier.weight.pow(2).sum()
    )
    loss.backward()
    return loss

  with torch.enable_grad():
    optimizer.step(closure)
  with torch.no_grad():
    predictions = classifier(test_x).argmax(1)
  return float((predictions == test_labels).double().mean())


# ---------------------------------------------------------------- training loop


def format_seconds(seconds):
  return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def train_simclr(model, unit_images, mean, std, args, probe=None):
  """Trains `model` in place with NT-Xent for exactly `args.steps` steps.

  The number of steps, never the wall clock, ends training, so one command
  gives one teacher on a fast or a slow machine. Epochs are reshuffled passes
  over `unit_images` (the last partial batch of each pass dropped).

  Args:
    model: from `build_simclr_resnet18`, on args.device.
    unit_images: (N, 1, 32, 32) in [0, 1], the unlabelled training images.
    mean, std: the normalisation (floats).
    args: the parsed flags.
    probe: None, or a function of the model returning the quick probe's
      accuracy; called every `args.probe_every` steps.

  Returns:
    The training log: one dict per progress line (step, epoch, mean loss of
    the window, seconds, and `probe` where one ran).
  """
  generator = torch.Generator().manual_seed(args.seed)
  steps_per_epoch = len(unit_images) // args.batch_size
  total_steps = args.steps
  warmup_steps = max(1, min(total_steps // 10, 100))
  optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
  # Linear warmup, then cosine decay to zero.
  schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer,
    lambda step: min(
      (step + 1) / warmup_steps, 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))
    ),
  )
  model.train()
  log = []
  start = time.time()
  window_start, window_loss, window_steps = start, 0.0, 0
  order = None
  for step in range(1, total_steps + 1):
    position = (step - 1) % steps_per_epoch
    if position == 0:
      order = torch.randperm(len(unit_images), generator=generator)
    batch = unit_images[order[position * args.batch_size : (position + 1) * args.batch_size]]
    # Both views go through one forward pass: half the Python overhead, and
    # BatchNorm sees the same statistics for both views.
    views = normalize_to_rgb(
      torch.cat([augment(batch, generator), augment(batch, generator)]), mean, std
    )
    projections = model(views)
    loss = nt_xent_loss(projections[: len(batch)], projections[len(batch) :], args.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    window_loss += loss.item()
    window_steps += 1
    probe_due = probe is not None and args.probe_every > 0 and step % args.probe_every == 0
    if step % args.log_every == 0 or step == total_steps or probe_due:
      elapsed = time.time() - start
      images_per_s = window_steps * args.batch_size / (time.time() - window_start)
      record = {
        "step": step,
        "epoch": round(step / steps_per_epoch, 3),
        "loss": window_loss / window_steps,
        "seconds": round(elapsed, 1),
      }
      line = (
        f"step {step}/{total_steps} (epoch {record['epoch']:.2f}) loss {record['loss']:.4f} "
        f"{images_per_s:.0f} images/s (2 views each) elapsed {format_seconds(elapsed)} "
        f"ETA {format_seconds((total_steps - step) * elapsed / step)}"
      )
      if probe_due:
        record["probe"] = probe(model)
        line += f" quick probe {record['probe']:.4f}"
        if args.keep_snapshots:
          torch.save(model.state_dict(), f"{args.output[:-4]}.step{step}.pth")
      print(line, flush=True)
      log.append(record)
      window_start, window_loss, window_steps = time.time(), 0.0, 0
  return log
