"""The distilled student as one module: backbone, node-embedding head and classifier.

This is what `ega_jax.export` writes and `ega_jax.load_student` returns: the
student exactly as training evaluates it (the backbone's pooled feature ->
`EmbeddingClassifierHead`), without the teacher, optimisers or CRD memory.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ega_jax.models import heads
from ega_jax.models.students import create_student


class DistilledStudent(nn.Module):
  """Backbone + node head + classifier of a distilled student.

  Variables: {'params': {'backbone': ..., 'head': ...}, 'batch_stats':
  {'backbone': ...}}.

  Attributes:
    arch: a name of ega_jax.models.STUDENT_NAMES.
    num_classes: classes of the classifier.
    feature_dim: width of the shared embedding space (the node head's output).
    dtype: computation dtype.
  """

  arch: str
  num_classes: int
  feature_dim: int
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = create_student(self.arch, self.num_classes, dtype=self.dtype)
    self.head = heads.EmbeddingClassifierHead(self.feature_dim, self.num_classes, dtype=self.dtype)

  def __call__(self, images: jnp.ndarray, train: bool = False):
    """Normalised images (B, H, W, 3) -> (logits (B, num_classes), features).

    `features` holds 'embedding' (B, feature_dim), 'penultimate' (B, D) and
    'stages' (the backbone's NHWC maps). Normalise uint8 images with
    `ega_jax.models.preprocess.normalize_images(images, meta['mean'], meta['std'])`.
    """
    _, backbone_features = self.backbone(images, train=train)
    embedding, logits = self.head(backbone_features["penultimate"])
    return logits.astype(jnp.float32), {
      "embedding": embedding.astype(jnp.float32),
      "penultimate": backbone_features["penultimate"],
      "stages": backbone_features["stages"],
    }
