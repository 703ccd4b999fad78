r"""Score a trained student on its dataset's evaluation split: top-1, top-5, cross-entropy, count.

  python -m ega_jax.evaluate --workdir=runs/ega [--which=best|latest|STEP] [--json=out.json]
  python -m ega_jax.evaluate --student=exported/ [--json=out.json]
  python -m ega_jax.evaluate --workdir=runs/ega --teacher_head   # also the teacher head's top-1

The split, its size (`dataset.max_eval_examples`) and the data directory come
from the run record: the workdir's `config.json`, or the export's
`student.json`; `--data_dir` reads the data from elsewhere. No teacher is loaded unless `--teacher_head` asks for the teacher
head's accuracy (workdir only; it runs the converted teacher named in the
record, live: a run that evaluated from a float16 teacher cache may differ by
a rounding-level tie). The student is scored in eval mode exactly as training
scores it (same dtype), so `--which=best` reproduces the logged best `eval/top1`.
"""

from __future__ import annotations

import json
import os
import sys

from ega_jax import config as config_lib

DEFAULT_BATCH_SIZE = 500


def evaluate_student(
  module,
  variables,
  meta: dict,
  *,
  dataset: str,
  data_dir: str | None,
  max_examples: int | None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  teacher=None,
) -> dict[str, float]:
  """Eval-mode scores of a `DistilledStudent` over a dataset's evaluation split.

  Args:
    module, variables, meta: as `ega_jax.load_student` returns them.
    teacher: None, or (DistillModels, teacher variables, teacher-head params)
      to score the teacher head as well.

  Returns:
    {'top1', 'top5' (percent), 'ce' (mean), 'count'} and, with a teacher,
    'teacher_top1'.
  """
  import jax
  import jax.numpy as jnp

  from ega_jax import data as data_lib
  from ega_jax.models import preprocess
  from ega_jax.train import steps

  with_teacher = teacher is not None
  teacher_arrays = (teacher[1], teacher[2]) if with_teacher else ()

  # The variables are arguments, not constants folded into the program.
  @jax.jit
  def sums(variables, teacher_arrays, images, labels, mask):
    normalised = preprocess.normalize_images(images, meta["mean"], meta["std"])
    logits, _ = module.apply(variables, normalised.astype(module.dtype), train=False)
    maskf = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    out = {
      "count": jnp.sum(maskf),
      "top1": jnp.sum(steps.correct_topk(logits, labels, 1) * maskf),
      "top5": jnp.sum(steps.correct_topk(logits, labels, k) * maskf),
      "ce": steps.cross_entropy_sum(logits, labels, maskf),
    }
    if with_teacher:
      models = teacher[0]
      teacher_variables, head_params = teacher_arrays
      feature = steps.live_teacher_embedding(models, teacher_variables, images)
      _, teacher_logits = models.teacher_head.apply({"params": head_params}, feature)
      out["teacher_top1"] = jnp.sum(steps.correct_topk(teacher_logits, labels, 1) * maskf)
    return out

  loader = data_lib.create_eval_loader(
    dataset,
    data_dir,
    global_batch_size=batch_size,
    max_examples=max_examples,
    # An image folder is resized to the size the student was trained on.
    image_size=int(meta["image_size"]) if dataset == "image_folder" else None,
  )
  if loader.source.image_size != int(meta["image_size"]):
    raise config_lib.UserInputError(
      f"the {dataset} evaluation images are {loader.source.image_size} pixels wide; the "
      f"student was trained on {meta['image_size']}."
    )
  totals = None
  for batch in loader:
    batch_sums = jax.device_get(
      sums(variables, teacher_arrays, batch["image"], batch["label"], batch["mask"])
    )
    totals = batch_sums if totals is None else {k: totals[k] + v for k, v in batch_sums.items()}
  count = max(float(totals["count"]), 1.0)
  result = {
    "top1": 100.0 * float(totals["top1"]) / count,
    "top5": 100.0 * float(totals["top5"]) / count,
    "ce": float(totals["ce"]) / count,
    "count": int(totals["count"]),
  }
  if with_teacher:
    result["teacher_top1"] = 100.0 * float(totals["teacher_top1"]) / count
  return result


def _teacher_for(config, workdir: str, step: int):
  """(DistillModels, teacher variables, teacher-head params) of a workdir's checkpoint."""
  from ega_jax import data as data_lib
  from ega_jax import export
  from ega_jax.train import setup
  from ega_jax.train import state as state_lib

  module, teacher_variables, teacher_meta = setup.load_teacher(config)
  info = data_lib.get_dataset_info(config.dataset)
  models = state_lib.build_models(config, module, teacher_meta, info.num_classes)
  head_params = export.restore_checkpoint(workdir, step)["teacher_head_params"]
  return models, teacher_variables, head_params


def evaluate(
  *,
  workdir: str | None = None,
  student: str | None = None,
  which: str = "best",
  data_dir: str | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  teacher_head: bool = False,
) -> dict:
  """Scores a workdir's checkpoint (`workdir`, `which`) or an export (`student`).

  Returns the scores of `evaluate_student` plus 'step', 'which', 'dataset'
  and 'logged_top1' (what training logged for that step, None if nothing).
  """
  from ega_jax import export
  from ega_jax.train import run_record

  if (workdir is None) == (student is None):
    raise config_lib.UserInputError("give exactly one of --workdir (a run) or --student (export).")
  if teacher_head and workdir is None:
    raise config_lib.UserInputError(
      "--teacher_head needs --workdir: an export holds the student only."
    )
  if workdir is not None:
    variables, meta = export.student_from_workdir(workdir, which)
    module = export.distilled_student(meta)
  else:
    module, variables, meta = export.load_student(student)
  dataset = meta["dataset"]
  data_dir = data_dir or meta.get("data_dir")
  max_examples = meta.get("max_eval_examples", -1)
  config = None
  if teacher_head:
    import ml_collections

    config = ml_collections.ConfigDict(run_record.read_record(workdir)["config"])
  teacher = _teacher_for(config, workdir, meta["step"]) if teacher_head else None
  scores = evaluate_student(
    module,
    variables,
    meta,
    dataset=dataset,
    data_dir=data_dir,
    max_examples=max_examples if max_examples and max_examples > 0 else None,
    batch_size=batch_size,
    teacher=teacher,
  )
  return {
    **scores,
    "step": meta["step"],
    "which": meta.get("which"),
    "dataset": dataset,
    "arch": meta["arch"],
    "logged_top1": meta.get("eval_top1"),
  }


def main(argv=None) -> int:
  import argparse

  from absl import logging

  parser = argparse.ArgumentParser(prog="ega-eval", description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="Training workdir (holds config.json and checkpoints).")
  source.add_argument("--student", help="Directory written by python -m ega_jax.export.")
  parser.add_argument(
    "--which", default=None, help="With --workdir: best (default), latest or a step."
  )
  parser.add_argument(
    "--data_dir", default=None, help="Read the dataset from here instead of the recorded place."
  )
  parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--teacher_head", action="store_true", help="Also score the teacher head.")
  parser.add_argument("--json", default=None, help="Write the scores to this JSON file.")
  args = parser.parse_args(argv)
  if args.student and args.which is not None:
    parser.error("--which needs --workdir: an export holds one step already.")
  # orbax's notes on opening a checkpoint read-only; the caller's level comes back after.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    scores = evaluate(
      workdir=args.workdir,
      student=args.student,
      which=args.which or "best",
      data_dir=args.data_dir,
      batch_size=args.batch_size,
      teacher_head=args.teacher_head,
    )
  except (config_lib.UserInputError, ValueError, KeyError, OSError) as error:
    print(f"error: {config_lib.one_line(error)}", file=sys.stderr)
    return 2
  finally:
    logging.set_verbosity(verbosity)
  line = (
    f"{scores['arch']} step {scores['step']} on {scores['dataset']} ({scores['count']} images): "
    f"top-1 {scores['top1']:.2f}%, top-5 {scores['top5']:.2f}%, CE {scores['ce']:.4f}"
  )
  if "teacher_top1" in scores:
    line += f", teacher head top-1 {scores['teacher_top1']:.2f}%"
  if scores["logged_top1"] is not None:
    line += f" (logged at that step: {scores['logged_top1']:.2f}%)"
  print(line)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(scores, f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
