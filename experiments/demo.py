r"""The offline demo, end to end: `make demo` runs this.

Stages (each shows its own progress; each is skipped when its output exists):
  1. the teacher: the SimCLR ResNet-18 checkpoint shipped in
     experiments/demo_teacher/ (checked against its recorded sha256), or with
     --retrain the same training rerun by python -m experiments.pretrain_demo_teacher;
  2. python -m launch.convert_teacher: that checkpoint -> Flax (the projection
     MLP is dropped);
  3. python -m launch.cache_teacher: the teacher's embeddings of every train
     image (a few crop/flip views each) and test image, computed once;
  4. the headline, label-scarce setting (configs/fashion_mnist_few_labels.py:
     3 labels per class, every other image unlabelled): the student with EGA,
     then the same student with cross-entropy only on the labelled images;
  5. the same two runs with every label.
Then one table: teacher probe, teacher-head accuracy, student top-1 with EGA
and with CE only in both settings, and the wall time of each stage.

  python -m experiments.demo [--output_dir demo_out] [--seed 0] [--retrain] [--fresh]
      [-- extra --config.* flags for every training]

Run it from the repository root (`make demo` does). This process imports
neither torch nor tensorflow: every stage runs in its own subprocess (torch and
tensorflow must not be imported in the wrong order).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from ega_jax.checksums import file_sha256

# The repository root: every stage runs there, as `python -m <module>`.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_LABELS_CONFIG = "configs/fashion_mnist.py"
HEADLINE_CONFIG = "configs/fashion_mnist_few_labels.py"
FASHION_MNIST_CLASSES = 10
SHIPPED_TEACHER = os.path.join(REPO, "experiments", "demo_teacher", "simclr_resnet18_fmnist.pth")
# Train views per image in the teacher cache (the student's crop/flip is free;
# the teacher's view is one of these).
CACHE_VIEWS = 1


def run_stage(title: str, command: list[str]) -> float:
  """Runs one stage with its output streamed through; returns its wall time."""
  print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
  start = time.time()
  result = subprocess.run(command, cwd=REPO)
  seconds = time.time() - start
  if result.returncode != 0:
    sys.exit(f"demo: stage '{title}' failed (exit code {result.returncode}); see its output above.")
  return seconds


def shipped_teacher() -> tuple[str, dict]:
  """(path, report) of the shipped checkpoint, after checking its sha256."""
  with open(SHIPPED_TEACHER + ".json") as f:
    report = json.load(f)
  found = file_sha256(SHIPPED_TEACHER)
  if found != report["sha256"]:
    sys.exit(
      f"demo: {SHIPPED_TEACHER} has sha256 {found}, but its .json records {report['sha256']}; "
      "the file is damaged (a git-lfs pointer or a partial checkout?). Restore it with "
      "git checkout, or rerun with --retrain to train it again."
    )
  return SHIPPED_TEACHER, report


def prepare_teacher(output_dir: str, retrain: bool) -> tuple[dict, str, str, dict[str, float]]:
  """Stages 1-3: the teacher checkpoint, its Flax conversion and its embedding cache.

  Returns:
    (the teacher's report, the converted teacher directory, the cache
    directory, wall time per stage).
  """
  wall = {}
  teacher_root = os.path.join(output_dir, "teacher")
  if retrain:
    with open(SHIPPED_TEACHER + ".json") as f:
      settings = json.load(f)["settings"]
    teacher_pth = os.path.join(teacher_root, "simclr_resnet18_fmnist.pth")
    # Every setting that changes the weights, as recorded with the shipped file.
    flags = [f"--{name}={value}" for name, value in settings.items()]
    wall["teacher pretraining (PyTorch SimCLR)"] = run_stage(
      "1/5 retrain the SimCLR teacher in PyTorch (the shipped checkpoint's settings)",
      [
        sys.executable,
        "-m",
        "experiments.pretrain_demo_teacher",
        "--output",
        teacher_pth,
        "--log_every=50",
        *flags,
      ],
    )
    with open(teacher_pth + ".json") as f:
      report = json.load(f)
  else:
    start = time.time()
    teacher_pth, report = shipped_teacher()
    print(
      f"\n=== 1/5 the SimCLR teacher: {os.path.relpath(teacher_pth, REPO)} "
      f"(shipped, sha256 checked; --retrain trains it again)",
      flush=True,
    )
    wall["teacher checkpoint (sha256 check)"] = time.time() - start

  teacher_dir = os.path.join(teacher_root, "flax")
  teacher_json = os.path.join(teacher_dir, "teacher.json")
  convert_command = [
    sys.executable,
    "-m",
    "launch.convert_teacher",
    "--arch",
    "resnet18",
    "--checkpoint",
    teacher_pth,
    "--output",
    teacher_dir,
    "--image_size",
    str(report["image_size"]),
    "--mean",
    *map(str, report["mean"]),
    "--std",
    *map(str, report["std"]),
  ]
  converted_from = os.path.join(teacher_root, "converted_from.txt")
  source_hash = file_sha256(teacher_pth)
  if os.path.exists(teacher_json) and _read(converted_from) == source_hash:
    print(f"\n=== 2/5 convert the teacher: cached ({teacher_dir})", flush=True)
    wall["conversion to Flax"] = 0.0
  else:
    shutil.rmtree(teacher_dir, ignore_errors=True)
    shutil.rmtree(os.path.join(teacher_root, "cache"), ignore_errors=True)
    wall["conversion to Flax"] = run_stage("2/5 convert the teacher to Flax", convert_command)
    with open(converted_from, "w") as f:
      f.write(source_hash)

  cache_dir = os.path.join(teacher_root, "cache")
  # cache_teacher resumes or finds a finished cache by itself.
  wall["teacher embedding cache"] = run_stage(
    "3/5 cache the teacher's embeddings (every train and test image, once)",
    [
      sys.executable,
      "-m",
      "launch.cache_teacher",
      f"--config={FULL_LABELS_CONFIG}",
      f"--config.teacher.checkpoint={teacher_dir}",
      f"--cache_dir={cache_dir}",
      f"--views={CACHE_VIEWS}",
    ],
  )
  return report, teacher_dir, cache_dir, wall


def _read(path: str) -> str | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip()


def train_stage(title, config, workdir, flags):
  """Runs (or finds) one training; returns (summary, wall seconds)."""
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    print(f"\n=== {title}: cached ({summary_path}); use --fresh to retrain", flush=True)
    with open(summary_path) as f:
      summary = json.load(f)
    return summary, summary.get("wall_time_s", float("nan"))
  command = [
    sys.executable,
    "-m",
    "ega_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *flags,
  ]
  seconds = run_stage(title, command)
  with open(summary_path) as f:
    return json.load(f), seconds


def labelled_setting_name(workdir: str) -> str:
  """'30 labels (3 per class)': the labels a run knew, from the labelled.json it wrote."""
  with open(os.path.join(workdir, "labelled.json")) as f:
    num_labelled = json.load(f)["num_labelled"]
  return f"{num_labelled:,} labels ({num_labelled // FASHION_MNIST_CLASSES} per class)"


def print_table(report, settings, wall):
  probe = report.get("linear_probe_accuracy")
  rows = [("teacher: linear probe on frozen SimCLR features (all labels)", f"{100 * probe:.2f}")]
  for name, runs in settings:
    ega, baseline = runs["ega"], runs["ce_only"]
    rows += [
      (f"{name}: teacher head (linear, CE on those labels)", f"{ega['teacher_top1']:.2f}"),
      (
        f"{name}: student with EGA, best / last",
        f"{ega['best_top1']:.2f} / {ega['last_top1']:.2f}",
      ),
      (
        f"{name}: student with CE only, best / last",
        f"{baseline['best_top1']:.2f} / {baseline['last_top1']:.2f}",
      ),
    ]
  width = max(len(name) for name, _ in rows)
  print("\n" + "=" * (width + 16))
  print("Fashion-MNIST test accuracy (%), 10,000 images")
  for name, value in rows:
    print(f"  {name:<{width}}  {value:>13}")
  print("Wall time per stage (s)")
  for name, seconds in wall.items():
    print(f"  {name:<{width}}  {seconds:>13.1f}")
  print("=" * (width + 16))


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m experiments.demo", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--output_dir", default="demo_out")
  parser.add_argument("--seed", type=int, default=0, help="config.seed of every training")
  parser.add_argument(
    "--retrain",
    action="store_true",
    help="train the teacher again (about an hour on 2 cores) instead of the shipped checkpoint",
  )
  parser.add_argument(
    "--fresh", action="store_true", help="retrain the students (the teacher stays cached)"
  )
  parser.add_argument("extra", nargs="*", help="extra --config.* flags for every training")
  args = parser.parse_args(argv)

  output_dir = (
    os.path.join(REPO, args.output_dir) if not os.path.isabs(args.output_dir) else args.output_dir
  )
  runs = os.path.join(output_dir, "runs" if args.seed == 0 else f"runs_seed{args.seed}")
  if args.fresh:
    shutil.rmtree(runs, ignore_errors=True)
  os.makedirs(runs, exist_ok=True)

  report, teacher_dir, cache_dir, wall = prepare_teacher(output_dir, args.retrain)
  common = [
    f"--config.teacher.checkpoint={teacher_dir}",
    f"--config.teacher.cache={cache_dir}",
    f"--config.seed={args.seed}",
    *args.extra,
  ]
  stages = (
    ("headline", "4/5", "few labels", HEADLINE_CONFIG),
    ("full_labels", "5/5", "every label", FULL_LABELS_CONFIG),
  )
  results = {}
  for key, number, name, config in stages:
    results[key] = {}
    for method, label in (("ega", "EGA"), ("none", "cross-entropy only")):
      run_key = "ega" if method == "ega" else "ce_only"
      summary, wall[f"{name}: student with {label}"] = train_stage(
        f"{number} {name}: the student with {label}",
        config,
        os.path.join(runs, f"{key}_{run_key}"),
        [f"--config.distill.method={method}", *common],
      )
      results[key][run_key] = summary

  print_table(
    report,
    [
      (labelled_setting_name(os.path.join(runs, "headline_ega")), results["headline"]),
      ("all 60,000 labels", results["full_labels"]),
    ],
    wall,
  )
  print(f"Graph pictures: {os.path.join(runs, 'headline_ega', 'graphs')}")
  summary_name = "demo_summary.json" if args.seed == 0 else f"demo_summary_seed{args.seed}.json"
  with open(os.path.join(output_dir, summary_name), "w") as f:
    json.dump(
      {
        "teacher": {k: v for k, v in report.items() if k != "training_log"},
        # The headline (label-scarce) setting keeps the top-level keys.
        "ega": results["headline"]["ega"],
        "ce_only": results["headline"]["ce_only"],
        "full_labels": results["full_labels"],
        "seed": args.seed,
        "wall_s": wall,
      },
      f,
      indent=2,
    )


if __name__ == "__main__":
  main()
