"""Pictures of the EGA graphs for one fixed evaluation batch.

`plot_ega_graphs` draws the teacher graph E_t, the student graph E_s and the
teacher-student node matrix N side by side, rows and columns sorted by label,
on one shared colour scale, and returns the rendered image (for TensorBoard
image summaries) and optionally writes a PNG.

Only NumPy and matplotlib are used, through matplotlib's object API on an Agg
canvas: no pyplot, so no global backend switch, no figure registry that leaks
memory in a long training run, and no display needed. Importing this module
does not import jax, torch or tensorflow.
"""

import numpy as np
from matplotlib import colors
from matplotlib import figure as mpl_figure
from matplotlib import image as mpl_image
from matplotlib.backends import backend_agg

# Pearson correlations live in [-1, 1]; a fixed scale makes pictures from
# different epochs (and the three panels) comparable.
COLOUR_SCALE_MIN = -1.0
COLOUR_SCALE_MAX = 1.0
COLOURMAP = "RdBu_r"  # Diverging: blue negative, white zero, red positive.
PANEL_TITLES = ("teacher graph E_t", "student graph E_s", "node matrix N (teacher × student)")
# Beyond this many classes in the batch, per-class tick labels would overlap.
MAX_LABELLED_CLASSES = 20


def label_order(labels):
  """Stable permutation that sorts `labels` (B,) ascending; returns int (B,)."""
  return np.argsort(np.asarray(labels), kind="stable")


def sort_by_label(matrix, labels):
  """Rows and columns of `matrix` (B, B) reordered by the stable label sort.

  Args:
    matrix: (B, B) array, row i and column i belonging to example i.
    labels: (B,) class labels of the examples.

  Returns:
    (B, B) array `matrix[order][:, order]` with `order = label_order(labels)`.
  """
  matrix = np.asarray(matrix)
  labels = np.asarray(labels)
  _check_square(matrix, "matrix", len(labels))
  order = label_order(labels)
  return matrix[np.ix_(order, order)]


def class_boundaries(sorted_labels):
  """Indices i (ascending) where sorted_labels[i] != sorted_labels[i - 1]; int (K-1,)."""
  sorted_labels = np.asarray(sorted_labels)
  return np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1


def _check_square(matrix, name, batch_size):
  if matrix.shape != (batch_size, batch_size):
    raise ValueError(
      f"{name} must have shape (B, B) = ({batch_size}, {batch_size}) to match the "
      f"{batch_size} labels, got shape {matrix.shape}."
    )


def plot_ega_graphs(
  teacher_graph,
  student_graph,
  node_matrix,
  labels,
  path=None,
  title=None,
  class_names=None,
  return_figure=False,
):
  """Draws E_t, E_s and N of one batch side by side, sorted by label.

  Args:
    teacher_graph: (B, B) teacher-teacher correlations E_t.
    student_graph: (B, B) student-student correlations E_s.
    node_matrix: (B, B) teacher-student correlations N (row: teacher example,
      column: student example).
    labels: (B,) integer class labels of the batch.
    path: if given, the PNG file to write (its folder must exist).
    title: optional figure title (e.g. the epoch).
    class_names: optional sequence mapping label -> name for the tick labels.
    return_figure: also return the matplotlib Figure (for inspection).

  Returns:
    uint8 (H, W, 3) RGB image of the figure; with `return_figure`, the pair
    (image, figure).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array (B,), got shape {labels.shape}.")
  batch_size = labels.shape[0]
  matrices = {
    "teacher_graph": teacher_graph,
    "student_graph": student_graph,
    "node_matrix": node_matrix,
  }
  sorted_matrices = []
  for name, matrix in matrices.items():
    matrix = np.asarray(matrix, dtype=np.float64)
    _check_square(matrix, name, batch_size)
    sorted_matrices.append(sort_by_label(matrix, labels))
  sorted_labels = labels[label_order(labels)]
  boundaries = class_boundaries(sorted_labels)

  fig = mpl_figure.Figure(figsize=(16, 5.2), dpi=100, layout="constrained")
  canvas = backend_agg.FigureCanvasAgg(fig)
  # One Normalize object shared by the three panels: one colour scale, one bar.
  shared_norm = colors.Normalize(vmin=COLOUR_SCALE_MIN, vmax=COLOUR_SCALE_MAX)
  axes = fig.subplots(1, 3)
  for ax, matrix, panel_title in zip(axes, sorted_matrices, PANEL_TITLES):
    shown = ax.imshow(matrix, cmap=COLOURMAP, norm=shared_norm, interpolation="nearest")
    ax.set_title(panel_title)
    # Pixel i is centred on i, so a class edge before index b sits at b - 0.5.
    for boundary in boundaries:
      ax.axhline(boundary - 0.5, color="black", linewidth=0.5)
      ax.axvline(boundary - 0.5, color="black", linewidth=0.5)
    _label_class_blocks(ax, sorted_labels, boundaries, class_names)
  axes[0].set_ylabel("teacher example")
  axes[0].set_xlabel("teacher example")
  axes[1].set_ylabel("student example")
  axes[1].set_xlabel("student example")
  axes[2].set_ylabel("teacher example")
  axes[2].set_xlabel("student example")
  fig.colorbar(shown, ax=list(axes), shrink=0.85, label="Pearson correlation")
  if title is not None:
    fig.suptitle(title)

  canvas.draw()
  image = np.array(canvas.buffer_rgba())[..., :3]  # Opaque white background.
  if path is not None:
    # The PNG is the returned array itself, so both show exactly the same pixels.
    mpl_image.imsave(path, image, format="png")
  return (image, fig) if return_figure else image


def _label_class_blocks(ax, sorted_labels, boundaries, class_names):
  """Puts one tick per class block, at its centre, named by label or class_names."""
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(sorted_labels)]])
  if len(starts) > MAX_LABELLED_CLASSES:
    return
  centres = (starts + ends - 1) / 2.0
  block_labels = sorted_labels[starts]
  if class_names is not None:
    if not all(0 <= int(label) < len(class_names) for label in block_labels):
      raise ValueError(
        f"class_names has {len(class_names)} names but labels range over "
        f"{block_labels.min()}..{block_labels.max()}; give one name per label 0..num_classes-1."
      )
    names = [str(class_names[int(label)]) for label in block_labels]
  else:
    names = [str(label) for label in block_labels]
  ax.set_xticks(centres, names, rotation=90, fontsize=7)
  ax.set_yticks(centres, names, fontsize=7)
