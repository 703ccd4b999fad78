r"""Export a trained student out of its workdir: Flax, safetensors or the released PyTorch layout.

  python -m ega_jax.export --workdir=runs/ega --output=student/ [--which=best|latest|STEP] \
      [--format=flax,safetensors,pytorch]

Reads one checkpoint of `workdir/checkpoints` and the run record
`workdir/config.json`, and writes only the student (backbone with its
BatchNorm statistics, node-embedding head and classifier) to OUTPUT:

  student.json         arch, num_classes, image_size, mean/std, feature_dim,
                       step, eval top-1 at that step, source workdir, config hash
  variables.msgpack    (flax) the `DistilledStudent` variables, flax.serialization
  student.safetensors  (safetensors) the same variables, keys 'params/backbone/conv1/kernel'
  {arch}_best.pth      (pytorch) the layout the released train_student.py saves:
                       {'model': model_s.state_dict(), 'layer': stud_net.state_dict(),
                        'epoch': ..., 'best_acc': ...}; `_last.pth` / `_step{N}.pth` for
                       --which=latest / a step

PyTorch layout: 'model' holds the backbone under RepDistiller's key names (the
Flax students are named so that a variable's path joined by '.' is its key).
The released EGA code removed the final `fc` of the CIFAR ResNets (resnet8 ...
resnet110, resnet8x4, resnet32x4), so for those it is left out; every other
arch keeps RepDistiller's own final classifier (linear / fc / classifier),
which EGA training never uses. 'layer' holds the released `StudNet`:
`fit_dim_Net` (Linear D -> feature_dim, the node head) and `cl_Net` (Linear
feature_dim -> num_classes, the classifier the student's predictions come
from). `ega_jax.load_student(OUTPUT)` reads the Flax or safetensors files back.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from ega_jax import config as config_lib
from ega_jax.export_layout import flat_items, pytorch_file_name, released_layout

FORMATS = ("flax", "safetensors", "pytorch")
META_NAME = "student.json"
FLAX_NAME = "variables.msgpack"
SAFETENSORS_NAME = "student.safetensors"


# ---------------------------------------------------------------------------
# Reading a workdir.


def _checkpoint_steps(workdir: str):
  """(all steps, latest step, best step or None) of workdir/checkpoints."""
  import orbax.checkpoint as ocp

  from ega_jax.train import checkpointing

  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise config_lib.UserInputError(
      f"{directory} does not exist: --workdir={workdir!r} holds no checkpoints to export."
    )
  options = ocp.CheckpointManagerOptions(
    best_fn=checkpointing.best_metric, best_mode="max", read_only=True
  )
  with ocp.CheckpointManager(directory, options=options) as manager:
    steps, latest = list(manager.all_steps()), manager.latest_step()
    best = manager.best_step()
    if latest is not None:
      # The run's own best (its first checkpoint of the highest top-1): orbax's
      # best_step() breaks ties the other way, by the latest.
      meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if meta.get("best_step") in steps:
        best = int(meta["best_step"])
    return steps, latest, best


def resolve_step(workdir: str, which: str) -> int:
  """The checkpoint step `which` names: 'best' (by eval/top1), 'latest' or a step number."""
  steps, latest, best = _checkpoint_steps(workdir)
  if not steps:
    raise config_lib.UserInputError(f"{workdir}/checkpoints holds no finished checkpoint.")
  if which == "latest":
    return int(latest)
  if which == "best":
    if best is None:
      raise config_lib.UserInputError(
        f"{workdir}/checkpoints has no evaluated checkpoint to call best; use --which=latest "
        f"or one of the steps {sorted(steps)}."
      )
    return int(best)
  if not which.isdigit() or int(which) not in steps:
    raise config_lib.UserInputError(
      f"--which={which!r} is not a checkpoint of {workdir}; valid: best, latest or one of the "
      f"steps {sorted(steps)}."
    )
  return int(which)


def logged_eval(workdir: str, step: int) -> dict[str, float]:
  """The eval/* scalars metrics.jsonl holds for `step` (the last record wins; {} if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  found = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if record.get("step") == step and "eval/top1" in record:
          found = {key: value for key, value in record.items() if key.startswith("eval/")}
  return found


def restore_checkpoint(workdir: str, step: int) -> dict:
  """The raw TrainState tree (nested dicts of NumPy arrays) of checkpoint `step`.

  Read onto this process's first device whatever mesh wrote it (8 GPUs, a pod
  slice): the state is replicated, so any one copy is the whole of it.
  """
  import jax
  import orbax.checkpoint as ocp

  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True)
  ) as manager:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=one_device)),
    )
  return _to_numpy(restored["state"])


def student_from_workdir(workdir: str, which: str = "best"):
  """(DistilledStudent variables, student.json meta) of one checkpoint of a training workdir."""
  from ega_jax.train import run_record

  record = run_record.read_record(workdir)
  step = resolve_step(workdir, which)
  state = restore_checkpoint(workdir, step)
  variables = {
    "params": {
      "backbone": state["student_params"]["backbone"],
      "head": state["student_params"]["head"],
    },
    "batch_stats": {"backbone": state["student_batch_stats"]},
  }
  variables = _to_numpy(variables)
  evaluation = logged_eval(workdir, step)
  config = record["config"]
  meta = {
    **record["student"],
    "step": step,
    "which": which,
    # 1-based, as the released loop counts epochs (the one this step is in).
    "epoch": max(1, math.ceil(step / max(1, int(record["steps_per_epoch"])))),
    "eval_top1": evaluation.get("eval/top1"),
    "eval_top5": evaluation.get("eval/top5"),
    "dataset": config["dataset"]["name"],
    # The evaluation split training scored: ega_jax.evaluate reads these.
    "data_dir": config["dataset"]["data_dir"],
    "max_eval_examples": config["dataset"]["max_eval_examples"],
    "dtype": config.get("dtype", "float32"),
    "teacher_arch": config["teacher"]["arch"],
    "distill_method": config["distill"]["method"],
    "source_workdir": os.path.abspath(workdir),
    "config_hash": record["config_hash"],
    "ega_jax_version": record["ega_jax_version"],
  }
  return variables, meta


def _to_numpy(tree):
  import jax

  return jax.tree.map(np.asarray, tree)


def _import_or_explain(module: str, what: str):
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise config_lib.UserInputError(
      f"--format={what} needs the {module} package, which is not installed; "
      "install it with pip install 'ega_jax[convert]'."
    ) from error


# ---------------------------------------------------------------------------
# Writing and reading an export.


def check_formats(formats) -> None:
  """UserInputError unless `formats` is a non-empty subset of FORMATS."""
  if not formats or set(formats) - set(FORMATS):
    raise config_lib.UserInputError(
      f"--format={','.join(formats)!s} is not valid; choose one or more of {', '.join(FORMATS)}."
    )


def _remove_earlier_export(output: str) -> None:
  """Deletes the files an earlier export listed in `output`, so no stale format survives."""
  meta_path = os.path.join(output, META_NAME)
  if not os.path.isfile(meta_path):
    return
  with open(meta_path) as f:
    earlier = json.load(f).get("files", [])
  for name in earlier + [META_NAME]:
    path = os.path.join(output, os.path.basename(name))
    if os.path.isfile(path):
      os.remove(path)


def write_export(output: str, variables, meta, formats=FORMATS) -> dict:
  """Writes the chosen formats and student.json to `output`; returns the meta written."""
  check_formats(formats)
  os.makedirs(output, exist_ok=True)
  _remove_earlier_export(output)
  files = []
  if "flax" in formats:
    from flax import serialization

    with open(os.path.join(output, FLAX_NAME), "wb") as f:
      f.write(serialization.msgpack_serialize(variables))
    files.append(FLAX_NAME)
  if "safetensors" in formats:
    safetensors_numpy = _import_or_explain("safetensors.numpy", "safetensors")
    flat = {"/".join(path): np.ascontiguousarray(value) for path, value in flat_items(variables)}
    safetensors_numpy.save_file(
      flat, os.path.join(output, SAFETENSORS_NAME), metadata={"student": json.dumps(meta)}
    )
    files.append(SAFETENSORS_NAME)
  if "pytorch" in formats:
    torch = _import_or_explain("torch", "pytorch")
    layout = released_layout(variables, meta)
    for part in ("model", "layer"):
      layout[part] = {key: torch.from_numpy(np.array(v)) for key, v in layout[part].items()}
    name = pytorch_file_name(meta)
    torch.save(layout, os.path.join(output, name))
    files.append(name)
  meta = {**meta, "files": files}
  with open(os.path.join(output, META_NAME), "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return meta


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  from flax import traverse_util

  return traverse_util.unflatten_dict(flat, sep="/")


def load_student(directory: str):
  """(module, variables, meta) of an export written by `python -m ega_jax.export`.

  `module` is a `DistilledStudent`; `module.apply(variables, images)` on
  images normalised with meta['mean'] / meta['std'] gives (logits, features).
  """
  meta_path = os.path.join(directory, META_NAME)
  if not os.path.isfile(meta_path):
    raise config_lib.UserInputError(
      f"{meta_path} does not exist: {directory!r} is not a student exported by "
      "python -m ega_jax.export."
    )
  with open(meta_path) as f:
    meta = json.load(f)
  listed = set(meta.get("files", []))
  flax_path = os.path.join(directory, FLAX_NAME)
  safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
  if FLAX_NAME in listed:
    from flax import serialization

    with open(flax_path, "rb") as f:
      variables = serialization.msgpack_restore(f.read())
  elif SAFETENSORS_NAME in listed:
    safetensors_numpy = _import_or_explain("safetensors.numpy", "safetensors")
    variables = _unflatten(safetensors_numpy.load_file(safetensors_path))
  else:
    raise config_lib.UserInputError(
      f"{directory!r} holds neither {FLAX_NAME} nor {SAFETENSORS_NAME}; export it again with "
      "--format=flax or --format=safetensors (a PyTorch-only export loads in PyTorch)."
    )
  return distilled_student(meta), variables, meta


def distilled_student(meta):
  """The `DistilledStudent` that student.json's arch, classes, width and dtype describe."""
  from ega_jax import config as config_lib
  from ega_jax.models.distilled import DistilledStudent

  return DistilledStudent(
    arch=meta["arch"],
    num_classes=int(meta["num_classes"]),
    feature_dim=int(meta["feature_dim"]),
    dtype=config_lib.DTYPES[meta.get("dtype", "float32")],
  )


# ---------------------------------------------------------------------------
# Command line.


def main(argv=None) -> int:
  import argparse

  from absl import logging

  parser = argparse.ArgumentParser(
    prog="ega-export", description=__doc__.split("\n\n")[0].strip('r"\n ')
  )
  parser.add_argument("--workdir", required=True, help="Training workdir (holds config.json).")
  parser.add_argument("--output", required=True, help="Directory to write the export to.")
  parser.add_argument(
    "--which", default="best", help="best (by eval/top1, default), latest, or a step number."
  )
  parser.add_argument(
    "--format", default=",".join(FORMATS), help=f"Comma-separated subset of {','.join(FORMATS)}."
  )
  args = parser.parse_args(argv)
  formats = tuple(part.strip() for part in args.format.split(",") if part.strip())
  if "pytorch" in formats:
    try:  # torch before anything imports tensorflow (the reverse order can segfault).
      import torch  # noqa: F401
    except ImportError:
      pass  # write_export says what to install.
  # orbax's notes on opening a checkpoint read-only; the caller's level comes back after.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    check_formats(formats)
    variables, meta = student_from_workdir(args.workdir, args.which)
    meta = write_export(args.output, variables, meta, formats)
  except (config_lib.UserInputError, ValueError, KeyError, OSError) as error:
    print(f"error: {config_lib.one_line(error)}", file=sys.stderr)
    return 2
  finally:
    logging.set_verbosity(verbosity)
  top1 = meta["eval_top1"]
  print(
    f"Exported {meta['arch']} (step {meta['step']}, eval top-1 "
    f"{'n/a' if top1 is None else f'{top1:.2f}%'}) to {args.output}: {', '.join(meta['files'])}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
