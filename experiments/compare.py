r"""Trains one student with every distiller on the same teacher, seed and budget.

  python -m experiments.compare --config=configs/fashion_mnist.py \
      --teacher=demo_out/teacher/flax --output_dir=demo_out/compare \
      --seeds=0,1 -- --config.num_train_steps=300

Each (method, seed) is one `python -m ega_jax.main` run in
OUTPUT_DIR/runs/<method>_seed<k> (a finished run is reused, so an interrupted
comparison continues where it stopped). Writes OUTPUT_DIR/results.md (method,
best and last top-1 as mean +- spread over seeds, wall time),
OUTPUT_DIR/results.png (a bar chart of best top-1) and OUTPUT_DIR/curves.png
(learning curves: eval top-1 and train loss against step, one line per method,
each the mean over all its seeds at every step they all logged; drawn by
ega_jax.plot from each run's metrics.jsonl).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from ega_jax import plot as plot_lib
from ega_jax.losses import DISTILL_METHODS as METHODS  # the one list of methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_workdir(args, method, seed):
  return os.path.join(args.output_dir, "runs", f"{method}_seed{seed}")


def run_one(args, method, seed, extra):
  workdir = run_workdir(args, method, seed)
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    print(f"[compare] {method} seed {seed}: reusing {summary_path}", flush=True)
  else:
    command = [
      sys.executable,
      "-m",
      "ega_jax.main",
      f"--config={args.config}",
      f"--workdir={workdir}",
      f"--config.teacher.checkpoint={args.teacher}",
      f"--config.distill.method={method}",
      f"--config.seed={seed}",
      "--config.graph_pictures=False",
    ]
    command += extra
    print(f"[compare] {method} seed {seed}: {' '.join(command)}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
      sys.exit(
        f"compare: the {method} run (seed {seed}) failed with exit code "
        f"{result.returncode}; its log is above and its workdir is {workdir}."
      )
    print(f"[compare] {method} seed {seed}: {time.time() - start:.0f}s", flush=True)
  with open(summary_path) as f:
    return json.load(f)


def format_stat(values):
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def write_results(args, results, extra):
  lines = [
    f"# Distiller comparison ({os.path.basename(args.config)})",
    "",
    f"Teacher: `{args.teacher}`; seeds: {args.seeds}; extra flags: "
    f"`{' '.join(extra) or '(none)'}`. Top-1 in % on the evaluation split "
    "(all of it unless the flags set `dataset.max_eval_examples`); with several seeds, "
    "mean ± sample standard deviation. Learning curves (mean over seeds): `curves.png`.",
    "",
    "| method | best top-1 | last top-1 | wall time (s) |",
    "|---|---|---|---|",
  ]
  for method, summaries in results.items():
    lines.append(
      f"| {method} | {format_stat([s['best_top1'] for s in summaries])} | "
      f"{format_stat([s['last_top1'] for s in summaries])} | "
      f"{np.mean([s['wall_time_s'] for s in summaries]):.0f} |"
    )
  path = os.path.join(args.output_dir, "results.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return path


def plot_results(args, results):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = list(results)
  best = [np.asarray([s["best_top1"] for s in results[m]]) for m in methods]
  means = [b.mean() for b in best]
  spreads = [b.std(ddof=1) if len(b) > 1 else 0.0 for b in best]
  fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
  colors = ["#c0392b" if m == "ega" else ("#7f8c8d" if m == "none" else "#2980b9") for m in methods]
  ax.bar(methods, means, yerr=spreads, color=colors, capsize=3)
  low = min(means) - max(3.0, 2 * max(spreads))
  ax.set_ylim(max(0.0, low), min(100.0, max(means) + max(2.0, 2 * max(spreads))))
  ax.set_ylabel("best test top-1 (%)")
  ax.set_title(f"student top-1 by distiller ({os.path.basename(args.config)})")
  for i, value in enumerate(means):
    ax.text(i, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
  fig.tight_layout()
  path = os.path.join(args.output_dir, "results.png")
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_curves(args, methods, seeds):
  """OUTPUT_DIR/curves.png: each method's eval/top1 and train/loss against step,
  averaged over `seeds` at the steps every seed logged; None if no run has metrics."""
  curves = {}
  for method in methods:
    try:
      runs = [plot_lib.read_metrics(run_workdir(args, method, seed)) for seed in seeds]
    except plot_lib.MetricsError as error:
      # A reused run from before metrics.jsonl existed should not cost the
      # other methods' curves (or the table, already written).
      print(f"[compare] no curve for {method}: {error}", flush=True)
      continue
    curves[method] = plot_lib.average_metrics(runs)
  if not curves:
    return None
  seeds_text = f"mean of seeds {args.seeds}" if len(seeds) > 1 else f"seed {args.seeds}"
  title = f"student learning curves by distiller ({os.path.basename(args.config)}, {seeds_text})"
  return plot_lib.plot_metrics(curves, os.path.join(args.output_dir, "curves.png"), title=title)


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m experiments.compare", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument(
    "--teacher",
    default="demo_out/teacher/flax",
    help="converted teacher directory (python -m launch.convert_teacher output)",
  )
  parser.add_argument("--output_dir", default="demo_out/compare")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", default="0")
  parser.add_argument("extra", nargs="*", help="extra --config.* flags for every run")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods has unknown {unknown}; valid: {', '.join(METHODS)}")
  if not os.path.exists(os.path.join(args.teacher, "teacher.json")):
    parser.error(
      f"--teacher={args.teacher} holds no teacher.json; run `make demo` or "
      "python -m launch.convert_teacher first."
    )
  seeds = [int(s) for s in args.seeds.split(",") if s]
  os.makedirs(args.output_dir, exist_ok=True)
  results = {m: [run_one(args, m, seed, args.extra) for seed in seeds] for m in methods}
  written = [write_results(args, results, args.extra), plot_results(args, results)]
  written.append(plot_curves(args, methods, seeds))
  print(f"wrote {', '.join(p for p in written if p)}")


if __name__ == "__main__":
  main()
