r"""Learning curves of training runs, read from their `metrics.jsonl`.

  python -m ega_jax.plot runs/kd_seed0 runs/ega_seed0 --output=curves.png \
      --labels=kd,ega --title="Fashion-MNIST, resnet8"

One PNG with two panels: `eval/top1` against step and `train/loss` against
step, one line per workdir (labelled by the workdir's basename unless --labels
is given). Each workdir must hold the `metrics.jsonl` that the training loop
writes (ega_jax/train/metric_writers.py); local paths and gs:// both work.

Like ega_jax/viz.py, drawing goes through matplotlib's object API on an Agg
canvas (no pyplot, no global backend switch, no display needed), and
importing this module does not import jax, torch or tensorflow.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg

METRICS_FILE = "metrics.jsonl"
EVAL_KEY = "eval/top1"
TRAIN_KEY = "train/loss"
# (key, y-axis label) of the two panels, left to right.
PANELS = ((EVAL_KEY, "eval top-1 (%)"), (TRAIN_KEY, "train loss"))
# 12 x 4.5 inches at 100 dpi: the PNG is 1200 x 450 pixels (savefig keeps the
# figure size; no bbox_inches="tight", so the size does not depend on labels).
FIGSIZE = (12.0, 4.5)
DPI = 100


class MetricsError(ValueError):
  """A workdir's metrics.jsonl is missing, malformed or lacks a needed record."""


def metrics_path(workdir):
  """The `metrics.jsonl` of `workdir` (str or path, local or gs://) as an epath.Path."""
  from etils import epath  # Only for reading gs:// workdirs; cheap, no tensorflow.

  return epath.Path(workdir) / METRICS_FILE


def read_metrics(workdir):
  """Every scalar series of one run's metrics.jsonl.

  Args:
    workdir: the training workdir holding `metrics.jsonl`.

  Returns:
    dict key -> (steps, values): for every key other than "step" (e.g.
    "train/loss", "eval/top1"), int64 steps (N,) strictly ascending and
    float64 values (N,), N the number of distinct steps that recorded the key.
    A run that was resumed from a checkpoint logs the steps after that
    checkpoint twice; the value written last is kept for each step.

  Raises:
    MetricsError: no metrics.jsonl, a malformed line, or no eval/top1 record.
  """
  path = metrics_path(workdir)
  if not path.exists():
    raise MetricsError(
      f"{path} does not exist: {workdir} is not a training workdir, or its run logged nothing yet."
    )
  lines = path.read_text().splitlines()
  # key -> {step: value}; later lines overwrite earlier ones for the same step.
  series: dict[str, dict[int, float]] = {}
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record.pop("step"))
      values = {key: float(value) for key, value in record.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
      if number == len(lines):
        # A run killed in the middle of an append can leave half a last line;
        # the complete lines before it are still a valid history.
        continue
      raise MetricsError(f"{path} line {number} is not a metrics record ({error}).") from None
    for key, value in values.items():
      series.setdefault(key, {})[step] = value
  if EVAL_KEY not in series:
    raise MetricsError(
      f"{path} holds no {EVAL_KEY} record: the run has not finished an evaluation yet."
    )
  metrics = {}
  for key, by_step in series.items():
    steps = np.array(sorted(by_step), dtype=np.int64)
    metrics[key] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
  return metrics


def average_metrics(runs):
  """Mean over runs (e.g. seeds) of each series, at the steps every run recorded.

  Args:
    runs: non-empty list of `read_metrics` dicts.

  Returns:
    dict key -> (steps (M,), mean values (M,)) for the keys present in every
    run; M is the number of steps common to all runs for that key (runs with
    the same config log and evaluate at the same steps, so nothing is lost).
  """
  if not runs:
    raise ValueError("average_metrics needs at least one run.")
  averaged = {}
  for key in set.intersection(*(set(run) for run in runs)):
    common = runs[0][key][0]
    for run in runs[1:]:
      common = np.intersect1d(common, run[key][0])
    # Steps are sorted and unique, so searchsorted finds each common step's index.
    values = [run[key][1][np.searchsorted(run[key][0], common)] for run in runs]
    averaged[key] = (common, np.mean(values, axis=0))
  return averaged


def plot_metrics(curves, output, title=None):
  """Draws eval/top1 and train/loss against step, one line per entry of `curves`.

  Args:
    curves: dict label -> metrics dict as returned by `read_metrics` (or
      `average_metrics`); insertion order is the legend order. A run without
      train/loss records just has no line in that panel.
    output: the PNG file to write (its folder is created if missing).
    title: optional figure title.

  Returns:
    `output`. The PNG is FIGSIZE * DPI pixels: (450, 1200) as (H, W).
  """
  fig = mpl_figure.Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  # One step axis for both panels: evaluations (rarer than train logs) line up
  # with the losses, and a run evaluated once is not drawn on a +-10-step axis.
  axes = fig.subplots(1, 2, sharex=True)
  for ax, (key, ylabel) in zip(axes, PANELS):
    for label, metrics in curves.items():
      if key in metrics:
        steps, values = metrics[key]
        # A marker per point: a short run may have only one or two evaluations.
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(key)
    ax.grid(True, alpha=0.3)
  # Distillers' total losses differ by an order of magnitude (EGA's Frobenius
  # norms start far above the CE), so a log scale keeps every curve readable.
  losses = [m[TRAIN_KEY][1] for m in curves.values() if TRAIN_KEY in m]
  if losses and all(np.all(v > 0) for v in losses):
    axes[1].set_yscale("log")
  if curves:
    axes[0].legend(fontsize=8)
  if title is not None:
    fig.suptitle(title)
  parent = os.path.dirname(os.fspath(output))
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(output, format="png")
  return output


def plot_learning_curves(workdirs, output, labels=None, title=None):
  """Reads each workdir's metrics.jsonl and draws all runs in one PNG.

  Args:
    workdirs: sequence of W training workdirs.
    output: the PNG file to write.
    labels: optional W legend labels (default: each workdir's basename).
    title: optional figure title.

  Returns:
    `output`.

  Raises:
    MetricsError: a workdir lacks metrics.jsonl or an eval/top1 record.
    ValueError: no workdirs, or labels and workdirs differ in number or repeat a label.
  """
  workdirs = [os.fspath(w) for w in workdirs]
  if not workdirs:
    raise ValueError("plot_learning_curves needs at least one workdir.")
  if labels is None:
    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels were given for {len(workdirs)} workdirs.")
  if len(set(labels)) != len(labels):
    raise ValueError(f"labels must be distinct, got {list(labels)}; pass --labels.")
  curves = {label: read_metrics(w) for label, w in zip(labels, workdirs)}
  return plot_metrics(curves, output, title=title)


def _flag_values():
  """The CLI's flags, on their own FlagValues rather than absl's global FLAGS:
  importing this module (compare.py, the tests) then defines no global flag
  that could clash with another CLI's."""
  from absl import flags

  flag_values = flags.FlagValues()
  flags.DEFINE_string("output", "curves.png", "The PNG file to write.", flag_values=flag_values)
  flags.DEFINE_list(
    "labels", None, "Comma-separated legend labels, one per workdir.", flag_values=flag_values
  )
  flags.DEFINE_string("title", None, "Figure title.", flag_values=flag_values)
  return flag_values


def main(argv=None):
  """`python -m ega_jax.plot W1 W2 ... --output=curves.png`; argv[0] is the program name."""
  from absl import flags

  argv = sys.argv if argv is None else list(argv)
  flag_values = _flag_values()
  if any(arg in ("-h", "--help", "-?", "--helpfull") for arg in argv[1:]):
    print(__doc__ + "\n" + flag_values.get_help())
    return
  try:
    workdirs = flag_values(argv)[1:]
  except flags.Error as error:
    raise SystemExit(f"ega_jax.plot: {error}") from None
  if not workdirs:
    raise SystemExit("ega_jax.plot: give at least one workdir: python -m ega_jax.plot W1 W2 ...")
  try:
    path = plot_learning_curves(
      workdirs,
      flag_values.output,
      labels=flag_values.labels or None,
      title=flag_values.title,
    )
  except ValueError as error:  # MetricsError included: one sentence, no traceback.
    raise SystemExit(f"ega_jax.plot: {error}") from None
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
