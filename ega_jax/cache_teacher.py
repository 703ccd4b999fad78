r"""Runs the frozen teacher once over K augmented views of every training image.

  ega-cache --config=configs/cifar100.py \
      --config.teacher.checkpoint=teachers/clip_vit_b32 --cache_dir=caches/clip_b32_c100 \
      --views=all

  python -m ega_jax.main --config=configs/cifar100.py --workdir=/tmp/run \
      --config.teacher.checkpoint=teachers/clip_vit_b32 \
      --config.teacher.cache=caches/clip_b32_c100

The cache holds float16 embeddings of K crop x flip views of each train
example (--views=all: every view, which reproduces the live pipeline's
teacher views exactly) and of each unaugmented eval image. Interrupted builds
resume where they stopped when run again with the same flags. Progress (with
an estimate of the time left) is logged every --log_every_s seconds.
Layout and semantics: ega_jax/data/teacher_cache.py and docs/performance.md.
In a checkout the same command is `python -m launch.cache_teacher`; `--config`
also takes a shipped config by name (`--config=cifar100`).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ega_jax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Training config (configs/*.py); its teacher and dataset fields are used.",
  lock_config=True,
)
flags.DEFINE_string("cache_dir", None, "Output directory (default: config.teacher.cache).")
flags.DEFINE_string(
  "views", "all", "'all' (every crop x flip view) or K, the views cached per train image."
)
flags.DEFINE_list("splits", ["train", "eval"], "Splits to cache: train, eval or both.")
flags.DEFINE_integer("batch_size", 256, "Views per teacher call (rounded up to the device count).")
flags.DEFINE_integer("seed", 0, "Chooses the K views of each image when K < all.")
flags.DEFINE_enum(
  "dtype",
  "float32",
  list(config_lib.DTYPES),
  "Compute dtype of the teacher's forward pass (storage is float16).",
)
flags.DEFINE_bool(
  "overwrite", False, "Replace a cache built with other settings instead of refusing."
)
flags.DEFINE_float("log_every_s", 30.0, "Seconds between progress lines (and progress saves).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from ega_jax import cache_builder

  config = FLAGS.config
  directory = FLAGS.cache_dir or config.teacher.get("cache", "")
  if not directory:
    print(
      "error: give --cache_dir (or set config.teacher.cache) to say where the cache goes.",
      file=sys.stderr,
    )
    sys.exit(2)
  try:
    manifest = cache_builder.build_teacher_cache(
      config,
      directory,
      views=FLAGS.views,
      splits=FLAGS.splits,
      batch_size=FLAGS.batch_size,
      seed=FLAGS.seed,
      compute_dtype=FLAGS.dtype,
      overwrite=FLAGS.overwrite,
      log_every_s=FLAGS.log_every_s,
      progress=lambda line: print(line, flush=True),
    )
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
  splits = ", ".join(
    f"{name} {entry['num_examples']} x {entry['num_views']}"
    for name, entry in manifest["splits"].items()
  )
  print(
    f"Teacher cache ready in {directory} ({splits} views, {manifest['feature_dim']}-d "
    f"float16). Train with --config.teacher.cache={directory}",
    flush=True,
  )
  logging.info("manifest: %s", manifest)


def run() -> None:
  """Console-script entry point (ega-cache)."""
  from ega_jax import cli, host_memory

  host_memory.reexec_with_malloc_tuning()
  app.run(main, flags_parser=cli.parse_flags_or_exit)


if __name__ == "__main__":
  run()
