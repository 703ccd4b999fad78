r"""The offline demo, end to end: `make demo` runs this.

Stages (each shows its own progress; each is skipped when its output exists):
  1. python -m experiments.pretrain_demo_teacher: a SimCLR ResNet-18 trained in
     PyTorch on Fashion-MNIST without labels, saved as a plain .pth with a
     projection MLP.
  2. python -m launch.convert_teacher: that checkpoint -> Flax (the MLP is
     dropped).
  3. python -m ega_jax.main --config=configs/fashion_mnist.py: EGA distillation.
  4. the same student trained with cross-entropy only (distill.method=none).
Then one table: teacher linear probe, teacher-head accuracy, student top-1
with EGA and with CE only, and the wall time of each stage.

  python -m experiments.demo [--output_dir demo_out] [--fresh] [-- extra --config.* flags]

Run it from the repository root (`make demo` does).

This process imports neither torch nor tensorflow: every stage runs in its own
subprocess (torch and tensorflow must not be imported in the wrong order).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# The repository root: every stage runs there, as `python -m <module>`.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/fashion_mnist.py"


def run_stage(title: str, command: list[str]) -> float:
  """Runs one stage with its output streamed through; returns its wall time."""
  print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
  start = time.time()
  result = subprocess.run(command, cwd=REPO)
  seconds = time.time() - start
  if result.returncode != 0:
    sys.exit(f"demo: stage '{title}' failed (exit code {result.returncode}); see its output above.")
  return seconds


def train_stage(title, workdir, teacher_dir, extra_flags):
  summary_path = os.path.join(workdir, "summary.json")
  command = [
    sys.executable,
    "-m",
    "ega_jax.main",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    f"--config.teacher.checkpoint={teacher_dir}",
    *extra_flags,
  ]
  if os.path.exists(summary_path):
    print(f"\n=== {title}: cached ({summary_path}); use --fresh to retrain", flush=True)
    with open(summary_path) as f:
      summary = json.load(f)
    return summary, summary.get("wall_time_s", float("nan")), True
  seconds = run_stage(title, command)
  with open(summary_path) as f:
    return json.load(f), seconds, False


def prepare_teacher(output_dir: str) -> tuple[dict, str, dict[str, float]]:
  """Stages 1-2: the SimCLR teacher (PyTorch) and its Flax conversion, each cached.

  Returns:
    (the pretraining report, the converted teacher directory, wall time per stage).
  """
  teacher_pth = os.path.join(output_dir, "teacher", "simclr_resnet18_fmnist.pth")
  teacher_dir = os.path.join(output_dir, "teacher", "flax")
  wall = {}
  wall["teacher pretraining (PyTorch SimCLR)"] = run_stage(
    "1/4 pretrain the SimCLR teacher in PyTorch",
    [sys.executable, "-m", "experiments.pretrain_demo_teacher", "--output", teacher_pth],
  )
  with open(teacher_pth + ".json") as f:
    teacher_report = json.load(f)

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
    str(teacher_report["image_size"]),
    "--mean",
    *map(str, teacher_report["mean"]),
    "--std",
    *map(str, teacher_report["std"]),
  ]
  if os.path.exists(teacher_json) and os.path.getmtime(teacher_json) >= os.path.getmtime(
    teacher_pth
  ):
    print(f"\n=== 2/4 convert the teacher: cached ({teacher_dir})", flush=True)
    wall["conversion to Flax"] = 0.0
  else:
    wall["conversion to Flax"] = run_stage("2/4 convert the teacher to Flax", convert_command)

  return teacher_report, teacher_dir, wall


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m experiments.demo", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--output_dir", default="demo_out")
  parser.add_argument(
    "--fresh", action="store_true", help="retrain the students (the teacher stays cached)"
  )
  parser.add_argument("extra", nargs="*", help="extra --config.* flags for both trainings")
  args = parser.parse_args(argv)

  output_dir = (
    os.path.join(REPO, args.output_dir) if not os.path.isabs(args.output_dir) else args.output_dir
  )
  runs = os.path.join(output_dir, "runs")
  if args.fresh:
    shutil.rmtree(runs, ignore_errors=True)
  os.makedirs(runs, exist_ok=True)
  wall = {}

  teacher_report, teacher_dir, teacher_wall = prepare_teacher(output_dir)
  wall.update(teacher_wall)

  ega, wall["student with EGA"], _ = train_stage(
    "3/4 distil the teacher into the student with EGA",
    os.path.join(runs, "ega"),
    teacher_dir,
    ["--config.distill.method=ega", *args.extra],
  )
  baseline, wall["student with CE only"], _ = train_stage(
    "4/4 train the same student with cross-entropy only",
    os.path.join(runs, "ce_only"),
    teacher_dir,
    ["--config.distill.method=none", *args.extra],
  )

  probe = teacher_report.get("linear_probe_accuracy")
  rows = [
    (
      "teacher: linear probe on frozen SimCLR features (PyTorch)",
      f"{100 * probe:.2f}" if probe is not None and probe <= 1 else f"{probe}",
    ),
    ("teacher head (Flax, trained by CE next to the EGA student)", f"{ega['teacher_top1']:.2f}"),
    ("student with EGA: best / last top-1", f"{ega['best_top1']:.2f} / {ega['last_top1']:.2f}"),
    (
      "student with CE only: best / last top-1",
      f"{baseline['best_top1']:.2f} / {baseline['last_top1']:.2f}",
    ),
  ]
  width = max(len(name) for name, _ in rows)
  print("\n" + "=" * (width + 16))
  print("Fashion-MNIST test accuracy (%), 10,000 images")
  for name, value in rows:
    print(f"  {name:<{width}}  {value:>12}")
  print("Wall time per stage (s)")
  for name, seconds in wall.items():
    print(f"  {name:<{width}}  {seconds:>12.1f}")
  print(f"Graph pictures: {os.path.join(runs, 'ega', 'graphs')}")
  print("=" * (width + 16))
  with open(os.path.join(output_dir, "demo_summary.json"), "w") as f:
    json.dump(
      {"teacher": teacher_report, "ega": ega, "ce_only": baseline, "wall_s": wall}, f, indent=2
    )


if __name__ == "__main__":
  main()
