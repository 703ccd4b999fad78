"""Input pipelines: grain loaders over TFDS ArrayRecord data sources, torchvision's
CIFAR files, Fashion-MNIST idx files and image folders (`sources` picks one).

Importing this package does not import TensorFlow (Datasets); the TFDS paths
import it lazily. See docs/data.md for how to prepare each dataset.
"""

from ega_jax.data.info import DATASET_NAMES
from ega_jax.data.info import DATASETS
from ega_jax.data.info import DatasetInfo
from ega_jax.data.info import get_dataset_info
from ega_jax.data.evaluation import create_eval_loader
from ega_jax.data.pipeline import create_train_loader
from ega_jax.data.evaluation import EvalLoader
from ega_jax.data.pipeline import train_labels

__all__ = [
  "DATASET_NAMES",
  "DATASETS",
  "DatasetInfo",
  "EvalLoader",
  "create_eval_loader",
  "create_train_loader",
  "get_dataset_info",
  "train_labels",
]
