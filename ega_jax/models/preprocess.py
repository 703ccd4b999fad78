"""Pre-processing on device: student normalisation and the teacher's own view of an image.

The host ships uint8 images at the student's resolution; resizing and
normalisation for the teacher happen here, on device, inside the steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def normalize_images(images_uint8: jnp.ndarray, mean, std) -> jnp.ndarray:
  """(B, H, W, 3) uint8 -> (B, H, W, 3) float32, (x/255 - mean) / std."""
  images = images_uint8.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def teacher_inputs(images_uint8: jnp.ndarray, image_size: int, mean, std) -> jnp.ndarray:
  """(B, h, w, 3) uint8 -> (B, S, S, 3) float32 for the teacher.

  Bicubic resize to the teacher's resolution (as the released code's
  `transforms.Resize(S, BICUBIC)`), clipped to the valid pixel range like a PIL
  image, then the teacher's own normalisation.
  """
  images = images_uint8.astype(jnp.float32) / 255.0
  batch, height, width, channels = images.shape
  if (height, width) != (image_size, image_size):
    images = jax.image.resize(images, (batch, image_size, image_size, channels), method="bicubic")
    images = jnp.clip(images, 0.0, 1.0)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def teacher_embedding(
  teacher: nn.Module,
  variables,
  images_uint8: jnp.ndarray,
  image_size: int,
  mean,
  std,
  dtype=jnp.float32,
) -> jnp.ndarray:
  """The frozen backbone on raw views: (B, h, w, 3) uint8 -> (B, D) float32.

  `teacher_inputs` (resize, clip, normalise) on device, then the teacher in
  `dtype`. The one place the teacher runs: live steps, evaluation, the
  embedding cache's builder and the benchmark.
  """
  images = teacher_inputs(images_uint8, image_size, mean, std)
  return teacher.apply(variables, images.astype(dtype)).astype(jnp.float32)
