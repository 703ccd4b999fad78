"""experiments.demo's wiring: which config and method each stage trains, and demo_summary.json.

The trainings themselves are replaced by a recorder (the real ones take minutes; `make demo`
runs them): each fake run reports an accuracy that encodes its (config, method), so a summary
key filled from the wrong run shows up as the wrong number.
"""

import json
import os
import re

from experiments import demo

FAKE_ACCURACY = {
  ("configs/fashion_mnist_few_labels.py", "ega"): 61.0,
  ("configs/fashion_mnist_few_labels.py", "none"): 47.0,
  ("configs/fashion_mnist.py", "ega"): 77.0,
  ("configs/fashion_mnist.py", "none"): 79.0,
}


def test_headline_keys_come_from_the_label_scarce_runs(tmp_path, monkeypatch, capsys):
  calls = []

  def fake_prepare_teacher(output_dir, retrain):
    return {"linear_probe_accuracy": 0.8512, "training_log": ["..."]}, "T", "C", {}

  def fake_train_stage(title, config, workdir, flags):
    method = next(f.split("=", 1)[1] for f in flags if f.startswith("--config.distill.method="))
    calls.append((config, method, os.path.basename(workdir), flags))
    os.makedirs(workdir, exist_ok=True)
    if config == demo.HEADLINE_CONFIG:  # a label-scarce run records its subset
      with open(os.path.join(workdir, "labelled.json"), "w") as f:
        json.dump({"num_labelled": 30}, f)
    top1 = FAKE_ACCURACY[(config, method)]
    summary = {"best_top1": top1, "last_top1": top1 - 0.5, "teacher_top1": top1 - 1}
    return summary, 1.0

  monkeypatch.setattr(demo, "prepare_teacher", fake_prepare_teacher)
  monkeypatch.setattr(demo, "train_stage", fake_train_stage)
  demo.main(["--output_dir", str(tmp_path)])

  assert demo.HEADLINE_CONFIG == "configs/fashion_mnist_few_labels.py"
  assert [(c, m, w) for c, m, w, _ in calls] == [
    ("configs/fashion_mnist_few_labels.py", "ega", "headline_ega"),
    ("configs/fashion_mnist_few_labels.py", "none", "headline_ce_only"),
    ("configs/fashion_mnist.py", "ega", "full_labels_ega"),
    ("configs/fashion_mnist.py", "none", "full_labels_ce_only"),
  ]
  for _, _, _, flags in calls:  # every run reads the converted teacher and its cache
    assert {"--config.teacher.checkpoint=T", "--config.teacher.cache=C"} <= set(flags)
  with open(tmp_path / "demo_summary.json") as f:
    summary = json.load(f)
  assert summary["ega"]["best_top1"] == 61.0
  assert summary["ce_only"]["best_top1"] == 47.0
  assert summary["full_labels"]["ega"]["best_top1"] == 77.0
  assert summary["full_labels"]["ce_only"]["best_top1"] == 79.0
  assert "training_log" not in summary["teacher"]
  table = capsys.readouterr().out
  assert re.search(
    r"30 labels \(3 per class\): student with EGA, best / last +61\.00 / 60\.50", table
  )
  assert re.search(
    r"30 labels \(3 per class\): student with CE only, best / last +47\.00 / 46\.50", table
  )
  assert "all 60,000 labels: student with CE only, best / last" in table
