"""On-disk teacher-embedding cache: format, view numbering, reading.

The frozen teacher's backbone embedding of an augmented view depends only on
the image and the view, so it can be computed once (`ega_jax.cache_builder`,
CLI `ega-cache`) and read back by the input pipeline instead of
running the teacher in every train step.

Views. Training views are zero-pad-`p`, crop, optional horizontal flip
(`augment.random_crop_flip`), so an image has exactly
V = 2 * (2p + 1)**2 views (162 for CIFAR's p = 4, 98 for Fashion-MNIST's
p = 3). View id v = (top * (2p + 1) + left) * 2 + flip.

A cache directory holds:

  cache.json                 the manifest (`MANIFEST_FILE`): teacher identity
                             (arch, variables sha256, resolution, mean, std),
                             dataset, padding, feature_dim, and per split the
                             number of examples and of views, whether it is
                             complete and, once it is, the size and sha256 of
                             each of its .npy files (checked when it is opened);
  {split}_features.npy       float16 (N, K, D): embedding of view k of example n;
  {split}_views.npy          int16 (N, K): the view id of each column;
  {split}_progress.json      {"rows_done": n}: examples [0, n) are written.

Splits: 'train' holds K views per training example (K = V: every view, so the
sampled teacher view is exactly the live pipeline's); 'eval' holds one view,
the unaugmented image (view id of top = left = p, no flip), for evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ega_jax.checksums import file_sha256

FORMAT_VERSION = 1
MANIFEST_FILE = "cache.json"
SPLITS = ("train", "eval")

# First entropy word of the per-example choice of cached views when K < V
# (see augment.VIEW_STREAM for why every stream has its own word).
CACHE_STREAM = 0x63616368  # 'cach'


def num_views(padding: int) -> int:
  """V: the number of distinct crop/flip views of an image."""
  return 2 * (2 * padding + 1) ** 2


def view_id(top: int, left: int, flip: bool, padding: int) -> int:
  """The id in [0, V) of the crop at (top, left) of the padded image, flipped or not."""
  return (int(top) * (2 * padding + 1) + int(left)) * 2 + int(bool(flip))


def view_params(view: int, padding: int) -> tuple[int, int, bool]:
  """(top, left, flip) of a view id; the inverse of `view_id`."""
  position, flip = divmod(int(view), 2)
  top, left = divmod(position, 2 * padding + 1)
  return top, left, bool(flip)


def centre_view(padding: int) -> int:
  """The view id of the unaugmented image (no shift, no flip)."""
  return view_id(padding, padding, False, padding)


def cached_view_ids(seed: int, index: int, count: int, padding: int) -> np.ndarray:
  """int16 (count,): the views cached for train example `index`.

  All V views in id order when count == V; otherwise `count` distinct views
  drawn uniformly, a pure function of (seed, index), sorted.
  """
  total = num_views(padding)
  if count == total:
    return np.arange(total, dtype=np.int16)
  rng = np.random.default_rng([CACHE_STREAM, seed, index])
  return np.sort(rng.choice(total, size=count, replace=False)).astype(np.int16)


def _paths(directory: str, split: str) -> dict[str, str]:
  return {
    "features": os.path.join(directory, f"{split}_features.npy"),
    "views": os.path.join(directory, f"{split}_views.npy"),
    "progress": os.path.join(directory, f"{split}_progress.json"),
  }


def read_manifest(directory: str) -> dict[str, Any]:
  """The parsed cache.json of a cache directory.

  Raises:
    FileNotFoundError / ValueError: one sentence naming the path.
  """
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; build the cache with ega-cache.")
  try:
    with open(path) as handle:
      manifest = json.load(handle)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON ({error}).") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{path} has format_version {manifest.get('format_version')!r}; this code reads "
      f"{FORMAT_VERSION}. Rebuild the cache with ega-cache."
    )
  return manifest


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  """Writes cache.json atomically (a reader never sees half a file)."""
  path = os.path.join(directory, MANIFEST_FILE)
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    json.dump(manifest, handle, indent=2)
    handle.write("\n")
  os.replace(temporary, path)


def rows_done(directory: str, split: str) -> int:
  """How many examples of `split` are written (0 if none)."""
  path = _paths(directory, split)["progress"]
  if not os.path.exists(path):
    return 0
  with open(path) as handle:
    return int(json.load(handle)["rows_done"])


def mark_rows_done(directory: str, split: str, rows: int) -> None:
  """Records that examples [0, rows) are on disk (call after flushing them)."""
  path = _paths(directory, split)["progress"]
  temporary = path + ".tmp"
  with open(temporary, "w") as handle:
    json.dump({"rows_done": int(rows)}, handle)
  os.replace(temporary, path)


def create_split_arrays(directory: str, split: str, view_ids: np.ndarray, feature_dim: int) -> None:
  """Creates the (still empty) feature file and the view table of a split.

  Args:
    view_ids: int16 (N, K) view id of every column.
  """
  paths = _paths(directory, split)
  np.save(paths["views"], view_ids.astype(np.int16))
  features = np.lib.format.open_memmap(
    paths["features"],
    mode="w+",
    dtype=np.float16,
    shape=(view_ids.shape[0], view_ids.shape[1], feature_dim),
  )
  features.flush()
  del features
  mark_rows_done(directory, split, 0)


def open_features(directory: str, split: str, mode: str = "r") -> np.memmap:
  """float16 (N, K, D) memory map of a split's features."""
  return np.load(_paths(directory, split)["features"], mmap_mode=mode)


def load_view_ids(directory: str, split: str) -> np.ndarray:
  """int16 (N, K): the view id of each cached column of a split."""
  return np.load(_paths(directory, split)["views"])


def split_arrays_exist(directory: str, split: str) -> bool:
  paths = _paths(directory, split)
  return os.path.exists(paths["features"]) and os.path.exists(paths["views"])


def split_file_records(directory: str, split: str) -> dict[str, dict[str, Any]]:
  """{'features': {'bytes', 'sha256'}, 'views': {...}}: what the manifest records of a
  complete split's files (the builder calls it when the split is finished)."""
  paths = _paths(directory, split)
  return {
    role: {"bytes": os.path.getsize(paths[role]), "sha256": file_sha256(paths[role])}
    for role in ("features", "views")
  }


def verify_split_files(directory: str, split: str, entry: dict[str, Any]) -> None:
  """Raises ValueError (one sentence naming the file) when a split's .npy files are
  missing, truncated or altered since the manifest recorded them."""
  where = os.path.join(directory, MANIFEST_FILE)
  records = entry.get("files")
  if not records:
    raise ValueError(
      f"{where} records no checksums for the {split!r} split (built before ega_jax recorded "
      "them); run ega-cache again with the same flags to add them."
    )
  paths = _paths(directory, split)
  for role, record in records.items():
    path = paths[role]
    if not os.path.isfile(path):
      raise ValueError(f"{path} is missing (recorded in {where}); rebuild the cache.")
    size = os.path.getsize(path)
    if size != record["bytes"]:
      raise ValueError(
        f"{path} is truncated or overwritten: {size} bytes, {where} records {record['bytes']}; "
        "rebuild the cache (ega-cache --overwrite)."
      )
    if file_sha256(path) != record["sha256"]:
      raise ValueError(
        f"{path} is corrupt: its sha256 differs from the one {where} records; rebuild the "
        "cache (ega-cache --overwrite)."
      )


class CachedFeatures:
  """Read access to one complete split of a cache (picklable for grain workers).

  Opening checks the split's files against the sizes and sha256 the manifest
  records (`verify_split_files`). The memory map is opened once per process:
  here, and again when a grain
  worker process unpickles the object. Never lazily from reader threads:
  numpy parses the .npy header with `ast`, which is not thread-safe in
  Python 3.11 (concurrent first reads failed with "AST constructor
  recursion depth mismatch").

  Attributes:
    num_examples, num_views (K), feature_dim (D), all_views (K == V),
    view_ids: int16 (N, K), or None when all_views (column = view id).
  """

  def __init__(self, directory: str, split: str):
    manifest = read_manifest(directory)
    entry = manifest.get("splits", {}).get(split)
    if entry is None or not entry.get("complete"):
      done = rows_done(directory, split) if entry else 0
      total = entry["num_examples"] if entry else "?"
      raise ValueError(
        f"teacher cache {directory!r} has no complete {split!r} split ({done} of {total} "
        "examples written); run ega-cache again to finish it."
      )
    verify_split_files(directory, split, entry)
    self.directory = directory
    self.split = split
    self.manifest = manifest
    self.num_examples = int(entry["num_examples"])
    self.num_views = int(entry["num_views"])
    self.all_views = bool(entry["all_views"])
    self.feature_dim = int(manifest["feature_dim"])
    self.padding = int(manifest["dataset"]["padding"])
    # With every view cached, column k is view id k: no table to hold (it
    # would be N x V int16 in every reader process).
    self.view_ids = None if self.all_views else load_view_ids(directory, split)
    self.features = open_features(directory, split)  # float16 (N, K, D)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["features"]  # a memory map would pickle as a full copy
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.features = open_features(self.directory, self.split)

  def feature(self, index: int, column: int) -> np.ndarray:
    """float16 (D,): the cached embedding in column `column` of example `index`."""
    return np.asarray(self.features[index, column])


def check_matches(
  manifest: dict[str, Any],
  *,
  directory: str,
  teacher_meta: dict[str, Any],
  dataset: str,
  padding: int,
) -> None:
  """Raises ValueError (one sentence) when a cache was built for another teacher or dataset.

  The split sizes are checked where the splits are opened (the loaders).

  Args:
    teacher_meta: the teacher.json the run loads.
  """
  teacher = manifest["teacher"]
  where = os.path.join(directory, MANIFEST_FILE)
  if teacher["variables_sha256"] != teacher_meta.get("variables_sha256"):
    raise ValueError(
      f"{where} was built from another teacher (arch {teacher['arch']}, variables sha256 "
      f"{teacher['variables_sha256'][:12]}...) than config.teacher.checkpoint (arch "
      f"{teacher_meta.get('arch')}, sha256 {str(teacher_meta.get('variables_sha256'))[:12]}...); "
      "rebuild it with ega-cache."
    )
  for field in ("image_size", "mean", "std"):
    if teacher[field] != teacher_meta.get(field):
      raise ValueError(
        f"{where} was built with teacher {field} {teacher[field]!r}, but the teacher now has "
        f"{teacher_meta.get(field)!r}; rebuild it with ega-cache."
      )
  if manifest["dataset"]["name"] != dataset:
    raise ValueError(
      f"{where} holds {manifest['dataset']['name']!r} embeddings but config.dataset.name is "
      f"{dataset!r}; build a cache for {dataset!r} with ega-cache."
    )
  if int(manifest["dataset"]["padding"]) != padding:
    raise ValueError(
      f"{where} was built with crop padding {manifest['dataset']['padding']}, the pipeline "
      f"uses {padding}; rebuild it with ega-cache."
    )
