"""Tests for ega_jax.viz: label sorting, the shared colour scale, the PNG."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from ega_jax import viz

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Six examples; the stable ascending sort of these labels, written out by hand:
# label 0 at indices 1, 3; label 1 at 2, 5; label 2 at 0, 4 (ties keep order).
LABELS = np.array([2, 0, 1, 0, 2, 1])
HAND_SORTED_ORDER = [1, 3, 2, 5, 0, 4]


def _correlation_blocks(labels, feature_dim=16, seed=0):
  """E_t, E_s, N from np.corrcoef of random class-structured embeddings."""
  rng = np.random.default_rng(seed)
  batch = len(labels)
  centres = rng.normal(size=(int(labels.max()) + 1, feature_dim))
  teacher = centres[labels] + 0.5 * rng.normal(size=(batch, feature_dim))
  student = teacher + 0.5 * rng.normal(size=(batch, feature_dim))
  graph = np.corrcoef(np.concatenate([teacher, student]))
  return graph[:batch, :batch], graph[batch:, batch:], graph[:batch, batch:]


def test_sort_by_label_matches_explicit_permutation():
  matrix = np.arange(36.0).reshape(6, 6)
  expected = np.array([[matrix[i, j] for j in HAND_SORTED_ORDER] for i in HAND_SORTED_ORDER])
  np.testing.assert_array_equal(viz.label_order(LABELS), HAND_SORTED_ORDER)
  np.testing.assert_array_equal(viz.sort_by_label(matrix, LABELS), expected)


def test_class_boundaries():
  np.testing.assert_array_equal(viz.class_boundaries([0, 0, 1, 1, 1, 4]), [2, 5])
  np.testing.assert_array_equal(viz.class_boundaries([3, 3, 3]), np.zeros(0, int))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("viz") / "graphs.png")
  teacher_graph, student_graph, node_matrix = _correlation_blocks(LABELS)
  image, figure = viz.plot_ega_graphs(
    teacher_graph,
    student_graph,
    node_matrix,
    LABELS,
    path=path,
    title="epoch 7",
    return_figure=True,
  )
  return path, image, figure, (teacher_graph, student_graph, node_matrix)


def test_png_decodes_to_the_returned_image(rendered):
  path, image, _, _ = rendered
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] > 100 and image.shape[1] > 300
  decoded = np.asarray(Image.open(path).convert("RGB"))
  assert decoded.shape == image.shape
  np.testing.assert_array_equal(decoded, image)
  # Not a blank canvas: the diverging colour map puts saturated colours in it.
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20


def test_panels_show_label_sorted_matrices_with_titles(rendered):
  _, _, figure, matrices = rendered
  panels = [ax for ax in figure.axes if ax.images]
  assert [ax.get_title() for ax in panels] == [
    "teacher graph E_t",
    "student graph E_s",
    "node matrix N (teacher × student)",
  ]
  for ax, matrix in zip(panels, matrices):
    expected = matrix[np.ix_(HAND_SORTED_ORDER, HAND_SORTED_ORDER)]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected)
  assert figure.get_suptitle() == "epoch 7"


def test_colour_scale_is_shared_with_one_colourbar(rendered):
  _, _, figure, _ = rendered
  shown = [image for ax in figure.axes for image in ax.images]
  assert len(shown) == 3
  for image in shown:
    assert image.get_clim() == (-1.0, 1.0)
    assert image.norm is shown[0].norm
  assert shown[0].get_cmap().name == "RdBu_r"
  # Three panels plus exactly one colour bar axis.
  assert len(figure.axes) == 4
  # Colours come from the shared scale: +1 and -1 map to the two map ends.
  colour_of = lambda value: shown[0].to_rgba(np.array([[value]]))[0, 0]
  assert colour_of(1.0)[0] > 0.3 and colour_of(1.0)[2] < 0.2  # dark red
  assert colour_of(-1.0)[2] > 0.3 and colour_of(-1.0)[0] < 0.2  # dark blue


def test_class_boundary_lines(rendered):
  _, _, figure, _ = rendered
  # Sorted labels 0 0 1 1 2 2: edges before rows/columns 2 and 4.
  for ax in (ax for ax in figure.axes if ax.images):
    positions = sorted(
      line.get_ydata()[0] if line.get_xdata()[0] != line.get_xdata()[1] else line.get_xdata()[0]
      for line in ax.lines
    )
    assert positions == [1.5, 1.5, 3.5, 3.5]


def test_wrong_shape_names_the_argument():
  teacher_graph, student_graph, node_matrix = _correlation_blocks(LABELS)
  with pytest.raises(ValueError, match=r"student_graph must have shape \(B, B\) = \(6, 6\)"):
    viz.plot_ega_graphs(teacher_graph, student_graph[:5, :5], node_matrix, LABELS)
  with pytest.raises(ValueError, match="class_names has 2 names"):
    viz.plot_ega_graphs(teacher_graph, student_graph, node_matrix, LABELS, class_names=["a", "b"])


def test_import_pulls_in_no_framework():
  code = (
    "import sys; import ega_jax.viz; "
    'print(sorted(m for m in ("torch", "tensorflow", "jax") if m in sys.modules))'
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
  )
  assert result.stdout.strip() == "[]"
