"""experiments.label_budget_probe: the linear probe on a label budget."""

import numpy as np
import pytest
import torch

from ega_jax.data import labelled as labelled_lib
from experiments import label_budget_probe as probe

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _inputs(rng, labels, test_labels):
  """'informative': class-mean + small noise; 'noise': no class information at all."""
  centres = rng.normal(size=(10, 16)) * 3
  informative = lambda y: centres[y] + rng.normal(size=(len(y), 16))  # noqa: E731
  noise = lambda y: rng.normal(size=(len(y), 16))  # noqa: E731
  return {
    "informative": (informative(labels), informative(test_labels)),
    "noise": (noise(labels), noise(test_labels)),
  }


def test_probe_separates_informative_from_uninformative_inputs():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 20)
  test_labels = np.repeat(np.arange(10), 50)
  rows = probe.probe_table(_inputs(rng, labels, test_labels), labels, test_labels, [1, 3], [0, 1])
  assert [(r["labels_per_class"], r["num_labelled"]) for r in rows] == [(1, 10), (3, 30)]
  for row in rows:
    assert len(row["informative"]) == len(row["noise"]) == 2
    assert min(row["informative"]) > 90  # the class means are 3 noise sds apart
    assert max(row["noise"]) < 25  # chance is 10 %
  table = probe.format_table(rows, ["informative", "noise"])
  assert table.splitlines()[0].startswith("| labels per class | informative: per seed (mean)")
  assert table.splitlines()[2].startswith("| 1 | ")


def test_probe_fits_on_exactly_the_labels_a_run_would_know():
  """Inputs that encode the train index: a probe's train rows are the chosen ones."""
  labels = np.repeat(np.arange(10), 20)
  seen = []

  def spy(train, train_labels, test, test_labels, **kwargs):
    seen.append(sorted(train[:, 0].numpy().astype(int).tolist()))
    assert kwargs["zero_init"] is True  # the deterministic fit (next test)
    return 0.5

  index_column = np.arange(len(labels), dtype=np.float32)[:, None]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(probe.simclr, "linear_probe_accuracy", spy)
    rows = probe.probe_table(
      {"index": (index_column, index_column[:5])}, labels, labels[:5], [2], [0, 3]
    )
  assert rows[0]["index"] == [50.0, 50.0]
  assert seen == [labelled_lib.choose_labelled(labels, 20, s, 10).tolist() for s in (0, 3)]
  assert seen[0] != seen[1]


def test_zero_init_probe_does_not_depend_on_torch_global_rng():
  """L-BFGS stopped early (3 iterations) from nn.Linear's random init moves with the RNG."""
  rng = np.random.default_rng(1)
  train_labels = np.repeat(np.arange(10), 3)
  test_labels = np.repeat(np.arange(10), 40)
  inputs = _inputs(rng, train_labels, test_labels)
  # Weakly informative: class means 0.5 noise sds apart, 16 dims, 3 rows per class.
  train, test = (0.15 * a + 0.85 * b for a, b in zip(inputs["informative"], inputs["noise"]))
  args = [torch.as_tensor(train, dtype=torch.float32), torch.as_tensor(train_labels)]
  args += [torch.as_tensor(test, dtype=torch.float32), torch.as_tensor(test_labels)]

  def accuracies(zero_init):
    results = []
    for torch_seed in range(6):
      torch.manual_seed(torch_seed)
      results.append(probe.simclr.linear_probe_accuracy(*args, steps=3, zero_init=zero_init))
    return results

  assert len(set(accuracies(zero_init=True))) == 1
  assert len(set(accuracies(zero_init=False))) > 1  # the failure the zero start removes


def test_cli_names_a_missing_cache(tmp_path):
  with pytest.raises(SystemExit, match=r"--cache=.* holds no cache.json; build it with ega-cache"):
    probe.main(["--cache", str(tmp_path), "--data_dir", FASHION_MNIST])


def test_cli_rejects_a_bad_list(capsys):
  with pytest.raises(SystemExit):
    probe.main(["--cache", "x", "--labels_per_class", "0,3"])
  assert "--labels_per_class: expected comma-separated integers >= 1" in capsys.readouterr().err
