"""Where metrics go: TensorBoard (clu) and `metrics.jsonl` on process 0."""

from __future__ import annotations

import json

import jax
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
  """clu MetricWriter that adds one JSON object per `write_scalars` to a file.

  Only scalars are written; images and other summaries go to TensorBoard.
  Records are buffered and appended at `flush()` (the loop flushes once per
  step at most), through etils' Path: local files and object stores whose
  filesystem supports appending (gs:// through tf.io.gfile) get the new lines
  added, never the whole file rewritten.
  """

  def __init__(self, path):
    self._path = path
    self._pending: list[str] = []
    path.parent.mkdir(parents=True, exist_ok=True)

  def write_scalars(self, step, scalars):
    record = {"step": int(step)}
    record.update({key: float(value) for key, value in scalars.items()})
    self._pending.append(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    if not self._pending:
      return
    with self._path.open("a") as f:
      f.write("".join(self._pending))
    self._pending = []

  def close(self):
    self.flush()


def create_metric_writer(workdir):
  """TensorBoard (clu) + metrics.jsonl on process 0; logging only elsewhere."""
  from clu import metric_writers  # Imports tensorflow; keep it off module import.

  if jax.process_index() > 0:
    return metric_writers.create_default_writer(str(workdir), just_logging=True)
  return metric_writers.MultiWriter(
    [
      metric_writers.create_default_writer(str(workdir), asynchronous=False),
      JsonlWriter(workdir / "metrics.jsonl"),
    ]
  )
