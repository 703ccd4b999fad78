r"""Does the teacher-embedding cache, or bfloat16, change the demo's accuracy?

  python -m experiments.accuracy_study [--output_dir demo_out] [--seeds 0 1 2] [--views 2]
      [--variants live cached bf16] [-- extra --config.* flags]

Runs the demo's EGA training (configs/fashion_mnist.py, the SimCLR ResNet-18
teacher of `make demo`, prepared and cached the same way) once per seed for
each variant:

  live     the teacher runs in every step (float32), as `make demo`;
  cached   python -m launch.cache_teacher first stores --views crop x flip views
           of each training image and the centre view of each test image;
           training reads them (config.teacher.cache);
  bf16     the teacher runs live, teacher and student compute in bfloat16
           (config.dtype=bfloat16; weights, optimiser and losses stay float32).

Seeds change the student's initialisation, the data order and the augmentation.
Prints mean and standard deviation of the best and last test top-1 per
variant, the wall time, and writes study.json / study.md under
<output_dir>/study. Runs whose summary.json exists are reused (delete the
directory to rerun).
"""

import argparse
import json
import os
import statistics
import sys
import time

from experiments import demo  # The teacher stages and the training stage.

VARIANTS = ("live", "cached", "bf16")


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m experiments.accuracy_study", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--output_dir", default="demo_out")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument(
    "--views",
    default="2",
    help="views per training image in the cache ('all' or a count; default 2)",
  )
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument("extra", nargs="*", help="extra --config.* flags for every training")
  args = parser.parse_args(argv)

  output_dir = (
    args.output_dir if os.path.isabs(args.output_dir) else os.path.join(demo.REPO, args.output_dir)
  )
  study_dir = os.path.join(output_dir, "study")
  os.makedirs(study_dir, exist_ok=True)
  _, teacher_dir, _ = demo.prepare_teacher(output_dir)

  cache_dir = os.path.join(study_dir, f"cache_views_{args.views}")
  cache_seconds = None
  if "cached" in args.variants:
    cache_seconds = demo.run_stage(
      f"teacher-embedding cache ({args.views} views per training image)",
      [
        sys.executable,
        "-m",
        "launch.cache_teacher",
        f"--config={demo.CONFIG}",
        f"--config.teacher.checkpoint={teacher_dir}",
        f"--cache_dir={cache_dir}",
        f"--views={args.views}",
      ],
    )

  flags = {
    "live": [],
    "cached": [f"--config.teacher.cache={cache_dir}"],
    "bf16": ["--config.dtype=bfloat16"],
  }
  results = {}
  for variant in args.variants:
    for seed in args.seeds:
      name = f"cached_views_{args.views}" if variant == "cached" else variant
      workdir = os.path.join(study_dir, f"{name}_seed{seed}")
      summary, seconds, _ = demo.train_stage(
        f"{variant}, seed {seed}",
        workdir,
        teacher_dir,
        [
          "--config.distill.method=ega",
          f"--config.seed={seed}",
          "--config.graph_pictures=False",
          *flags[variant],
          *args.extra,
        ],
      )
      results.setdefault(variant, []).append(
        {
          "seed": seed,
          "best_top1": summary["best_top1"],
          "last_top1": summary["last_top1"],
          "teacher_top1": summary["teacher_top1"],
          "wall_s": seconds,
        }
      )

  def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

  lines = [
    f"EGA on the Fashion-MNIST demo, seeds {', '.join(map(str, args.seeds))} "
    f"(cache: {args.views} views per training image).",
    "",
    "| variant | best top-1 (mean ± sd) | last top-1 (mean ± sd) | teacher head top-1 | "
    "per-seed best | wall per run (s) |",
    "|---|---|---|---|---|---|",
  ]
  for variant, runs in results.items():
    best, last, head = (
      mean_sd([r[key] for r in runs]) for key in ("best_top1", "last_top1", "teacher_top1")
    )
    per_seed = ", ".join(f"{r['best_top1']:.2f}" for r in runs)
    lines.append(
      f"| {variant} | {best[0]:.2f} ± {best[1]:.2f} | {last[0]:.2f} ± {last[1]:.2f} | "
      f"{head[0]:.2f} ± {head[1]:.2f} | {per_seed} | "
      f"{statistics.mean(r['wall_s'] for r in runs):.0f} |"
    )
  if cache_seconds is not None:
    lines += ["", f"Building the cache took {cache_seconds:.0f} s (once, shared by the seeds)."]
  table = "\n".join(lines)
  print("\n" + table)
  with open(os.path.join(study_dir, "study.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(study_dir, "study.json"), "w") as f:
    json.dump(
      {
        "views": args.views,
        "seeds": args.seeds,
        "results": results,
        "cache_build_s": cache_seconds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
      },
      f,
      indent=2,
    )


if __name__ == "__main__":
  main()
