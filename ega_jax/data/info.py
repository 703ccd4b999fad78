"""Static facts about the supported datasets (no I/O, no heavy imports), and the one
place that resolves a config's dataset to its `DatasetInfo`: for `image_folder`
those facts come from the folder (`ega_jax.data.folders`, imported on demand).
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about a dataset.

  Attributes:
    name: registry name, e.g. 'cifar100'.
    num_classes: number of labels.
    image_size: height == width of the stored images (pixels).
    num_train: examples in the labelled train split.
    num_test: examples in the split used for evaluation.
    mean: per-channel (R, G, B) mean of the train images on a 0..1 scale,
      used to normalise the student's input on device.
    std: per-channel (R, G, B) standard deviation, same scale.
  """

  name: str
  num_classes: int
  image_size: int
  num_train: int
  num_test: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


DATASETS: dict[str, DatasetInfo] = {
  # Constants as used by RepDistiller/CRD, whose CIFAR pipeline the EGA
  # release follows.
  "cifar100": DatasetInfo(
    name="cifar100",
    num_classes=100,
    image_size=32,
    num_train=50_000,
    num_test=10_000,
    mean=(0.5071, 0.4867, 0.4408),
    std=(0.2675, 0.2565, 0.2761),
  ),
  # The usual CIFAR-10 constants (population statistics of the 50k train images).
  "cifar10": DatasetInfo(
    name="cifar10",
    num_classes=10,
    image_size=32,
    num_train=50_000,
    num_test=10_000,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
  ),
  # 5k labelled train images only (the 100k 'unlabelled' split is unused).
  "stl10": DatasetInfo(
    name="stl10",
    num_classes=10,
    image_size=96,
    num_train=5_000,
    num_test=8_000,
    mean=(0.4467, 0.4398, 0.4066),
    std=(0.2603, 0.2566, 0.2713),
  ),
  # Evaluated on the official 'val' split (the 'test' split is unlabelled).
  "tiny_imagenet": DatasetInfo(
    name="tiny_imagenet",
    num_classes=200,
    image_size=64,
    num_train=100_000,
    num_test=10_000,
    mean=(0.4802, 0.4481, 0.3975),
    std=(0.2302, 0.2265, 0.2262),
  ),
  # Grayscale replicated to 3 channels, so all channels share the
  # statistics (computed from the 60k train images).
  "fashion_mnist": DatasetInfo(
    name="fashion_mnist",
    num_classes=10,
    image_size=28,
    num_train=60_000,
    num_test=10_000,
    mean=(0.2860, 0.2860, 0.2860),
    std=(0.3530, 0.3530, 0.3530),
  ),
}


# Bring-your-own images (`ega_jax.data.folders`): classes, counts and statistics
# come from config.dataset.data_dir, its size from config.dataset.image_size.
IMAGE_FOLDER = "image_folder"
DEFAULT_IMAGE_SIZE = 32
# Every valid config.dataset.name.
DATASET_NAMES: tuple[str, ...] = (*sorted(DATASETS), IMAGE_FOLDER)


def _field(dataset: Any, key: str) -> Any:
  getter = getattr(dataset, "get", None)
  return getter(key) if getter is not None else getattr(dataset, key, None)


def get_dataset_info(dataset: Any) -> DatasetInfo:
  """The `DatasetInfo` of a dataset.

  Args:
    dataset: a registered name (a key of `DATASETS`), or a config's `dataset`
      section (a ConfigDict, dict or object with `name` and the optional
      `data_dir`, `image_size`, `mean`, `std`). `image_folder` needs the
      section: its classes, counts and (unless mean/std are given) statistics
      are read from `data_dir` at `image_size`. A registered dataset ignores
      `image_size`, and refuses `mean`/`std` (its constants are fixed).
  """
  if isinstance(dataset, str):
    name, section = dataset, None
  else:
    name, section = _field(dataset, "name"), dataset
  if name == IMAGE_FOLDER:
    if section is None:
      raise ValueError(
        "image_folder's classes and statistics come from its folder: pass the config's "
        "dataset section (name, data_dir, image_size, mean, std), not the name alone."
      )
    from ega_jax.data import folders  # pylint: disable=g-import-not-at-top

    return folders.folder_info(
      _field(section, "data_dir"),
      _field(section, "image_size"),
      _field(section, "mean"),
      _field(section, "std"),
    )
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset name {name!r}; valid names are {', '.join(DATASET_NAMES)}.")
  if section is not None:
    for key in ("mean", "std"):
      value = _field(section, key)
      if value is not None and len(value):
        from ega_jax.data import preparation  # pylint: disable=g-import-not-at-top

        raise preparation.config_error(
          f"config.dataset.{key}={value!r} is only read for image_folder; {name} uses its "
          f"fixed constants {getattr(DATASETS[name], key)}, so leave it unset."
        )
  return DATASETS[name]


def record_image_size(name: str, image_size: int | None = None) -> int:
  """Side of the records the loaders yield: `image_size` (None: 32) for image_folder,
  else the registered size, which a given `image_size` must equal."""
  if name == IMAGE_FOLDER:
    from ega_jax.data import folders  # pylint: disable=g-import-not-at-top

    return folders.check_image_size(image_size)
  stored = get_dataset_info(name).image_size
  if image_size is not None and int(image_size) != stored:
    raise ValueError(
      f"{name} images are {stored}x{stored}; image_size={image_size} is only for image_folder."
    )
  return stored
