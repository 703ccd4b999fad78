"""TFDS builder for Tiny ImageNet (200 classes, 64x64), plus a CLI to build it.

Source: the official `tiny-imagenet-200.zip` (either the zip or its extracted
`tiny-imagenet-200/` folder in `--manual_dir`; without one the zip is
downloaded from `URL`). Layout read here:

  tiny-imagenet-200/wnids.txt                     the 200 class wnids
  tiny-imagenet-200/words.txt                     wnid<TAB>description
  tiny-imagenet-200/train/<wnid>/images/<wnid>_<k>.JPEG
  tiny-imagenet-200/val/images/val_<k>.JPEG
  tiny-imagenet-200/val/val_annotations.txt       file<TAB>wnid<TAB>4 box ints

Splits: 'train' (100k) and 'validation' (10k). The official 'test' images
carry no labels and are not built. Labels index the wnids in sorted order
(as torchvision's ImageFolder over train/ does). A few source JPEGs are
grayscale; they are stored as RGB.

Build (writes ArrayRecord, which `tfds.data_source` needs):

  python -m ega_jax.data.tiny_imagenet --manual_dir=DIR --data_dir=DATA_DIR

Importing this module imports TensorFlow Datasets and registers the builder
under the name 'tiny_imagenet'.
"""

import argparse
import collections
import io
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_NAME = "tiny-imagenet-200.zip"
ROOT = "tiny-imagenet-200"
IMAGE_SIZE = 64


class _ArchiveReader:
  """Reads files below `tiny-imagenet-200/` from the zip or its folder."""

  def __init__(self, location: str):
    self.location = os.fspath(location)
    self._zip = None
    if zipfile.is_zipfile(self.location):
      self._zip = zipfile.ZipFile(self.location)
      self._names = set(self._zip.namelist())
      # folder -> file names, built once (the real zip has ~120k entries).
      self._folders = collections.defaultdict(list)
      for name in sorted(self._names):
        folder, _, file_name = name.rpartition("/")
        if file_name:
          self._folders[folder].append(file_name)

  def read(self, relative_path: str) -> bytes:
    path = f"{ROOT}/{relative_path}"
    if self._zip is not None:
      if path not in self._names:
        raise FileNotFoundError(f"{path} is missing from {self.location}.")
      return self._zip.read(path)
    with open(os.path.join(self.location, path), "rb") as stream:
      return stream.read()

  def list_dir(self, relative_dir: str) -> list[str]:
    """Sorted file names directly inside `relative_dir`."""
    if self._zip is not None:
      return list(self._folders.get(f"{ROOT}/{relative_dir.rstrip('/')}", []))
    return sorted(os.listdir(os.path.join(self.location, ROOT, relative_dir)))


def _find_archive(manual_dir: str) -> str | None:
  """The zip, or the folder that contains the extracted `tiny-imagenet-200/`."""
  zip_path = os.path.join(manual_dir, ARCHIVE_NAME)
  if os.path.isfile(zip_path):
    return zip_path
  if os.path.isfile(os.path.join(manual_dir, ROOT, "wnids.txt")):
    return manual_dir
  return None


def _read_lines(reader: _ArchiveReader, relative_path: str) -> list[str]:
  text = reader.read(relative_path).decode("utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]


def _decode_rgb(jpeg_bytes: bytes, file_name: str) -> np.ndarray:
  """uint8 (64, 64, 3); grayscale (mode 'L') sources are converted to RGB."""
  with Image.open(io.BytesIO(jpeg_bytes)) as image:
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
  if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(
      f"{file_name} is {pixels.shape[1]}x{pixels.shape[0]}, Tiny ImageNet "
      f"images are {IMAGE_SIZE}x{IMAGE_SIZE}."
    )
  return pixels


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet: 200 classes, 500 train and 50 validation images each."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "train and validation splits from the official zip."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Place {ARCHIVE_NAME} (from {URL}) or its extracted {ROOT}/ folder in "
    "the manual_dir; without it the zip is downloaded."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    # Class names are only known from wnids.txt; builds set them in
    # `_split_generators`, reads take them from the stored dataset_info.
    return tfds.core.DatasetInfo(
      builder=self,
      description="Tiny ImageNet (CS231n): 64x64 images of 200 classes.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
          # Names (the sorted wnids) are set when building; 200 for the
          # official archive.
          "label": tfds.features.ClassLabel(),
          "file_name": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    )

  def _archive(self, dl_manager: tfds.download.DownloadManager) -> str:
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError:  # No (or an empty) manual_dir: download.
      return os.fspath(dl_manager.download(URL))
    archive = _find_archive(manual_dir)
    if archive is None:
      raise FileNotFoundError(
        f"Neither {ARCHIVE_NAME} nor an extracted {ROOT}/wnids.txt is in manual_dir {manual_dir}."
      )
    return archive

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    reader = _ArchiveReader(self._archive(dl_manager))
    wnids = sorted(_read_lines(reader, "wnids.txt"))
    if len(set(wnids)) != len(wnids):
      raise ValueError("wnids.txt lists a class twice.")
    # ClassLabel names must be set before any example is encoded.
    self.info.features["label"].names = wnids
    return {
      "train": self._generate_train(reader, wnids),
      "validation": self._generate_validation(reader, wnids),
    }

  def _generate_examples(self, **kwargs):
    raise NotImplementedError("Splits are generated by _generate_train/_generate_validation.")

  def _generate_train(
    self, reader: _ArchiveReader, wnids: list[str]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    for wnid in wnids:
      for file_name in reader.list_dir(f"train/{wnid}/images"):
        if not file_name.upper().endswith(".JPEG"):
          continue
        pixels = _decode_rgb(reader.read(f"train/{wnid}/images/{file_name}"), file_name)
        yield file_name, {"image": pixels, "label": wnid, "file_name": file_name}

  def _generate_validation(
    self, reader: _ArchiveReader, wnids: list[str]
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    known = set(wnids)
    for line in _read_lines(reader, "val/val_annotations.txt"):
      fields = line.split("\t")
      if len(fields) < 2:
        raise ValueError(f"val/val_annotations.txt line {line!r} lacks the file<TAB>wnid columns.")
      file_name, wnid = fields[0], fields[1]
      if wnid not in known:
        raise ValueError(
          f"val/val_annotations.txt labels {file_name} with {wnid}, which is not in wnids.txt."
        )
      pixels = _decode_rgb(reader.read(f"val/images/{file_name}"), file_name)
      yield file_name, {"image": pixels, "label": wnid, "file_name": file_name}


def prepare(manual_dir: str | None, data_dir: str) -> TinyImagenet:
  """Builds the dataset as ArrayRecord in `data_dir`; returns the builder.

  Raises:
    FileNotFoundError: `manual_dir` is given but holds neither the zip nor
      the extracted folder (instead of silently downloading).
  """
  if manual_dir and _find_archive(os.fspath(manual_dir)) is None:
    raise FileNotFoundError(
      f"Neither {ARCHIVE_NAME} nor an extracted {ROOT}/wnids.txt is in "
      f"manual_dir {manual_dir}; download {URL} there, or omit manual_dir "
      "to download it."
    )
  builder = TinyImagenet(data_dir=data_dir, file_format="array_record")
  download_config = tfds.download.DownloadConfig(
    manual_dir=os.fspath(manual_dir) if manual_dir else None
  )
  builder.download_and_prepare(download_config=download_config)
  return builder


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Build Tiny ImageNet as a TFDS ArrayRecord dataset.")
  parser.add_argument(
    "--manual_dir",
    default=None,
    help=f"folder with {ARCHIVE_NAME} or the extracted {ROOT}/ folder (omit to download the zip).",
  )
  parser.add_argument(
    "--data_dir", required=True, help="TFDS data directory to write tiny_imagenet/1.0.0/ into."
  )
  args = parser.parse_args(argv)
  try:
    builder = prepare(args.manual_dir, args.data_dir)
  except FileNotFoundError as error:
    parser.exit(1, f"error: {error}\n")
  print(f"tiny_imagenet prepared in {builder.data_dir}")


if __name__ == "__main__":
  main()
