"""Static facts about the supported datasets (no I/O, no heavy imports)."""

import dataclasses


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


def get_dataset_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` registered under `name`."""
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset name {name!r}; valid names are {', '.join(sorted(DATASETS))}."
    )
  return DATASETS[name]
