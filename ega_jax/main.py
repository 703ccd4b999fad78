r"""Entry point: distil a converted teacher into a student.

  python -m ega_jax.main --config=configs/cifar100.py --workdir=/tmp/run \
      --config.teacher.checkpoint=teachers/clip_vit_b32

Every config field can be overridden (`--config.distill.method=rkd`). Launched
as several processes (Cloud TPU pod, SLURM, or explicit --coordinator_address /
--num_processes / --process_id), the processes join one jax.distributed job.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for multi-process runs outside TPU/SLURM."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer(
  "heartbeat_timeout_s",
  100,
  "Multi-process runs: seconds without a heartbeat after which jax.distributed declares a "
  "process lost and aborts the others. ega_jax's own watch (peer_watch.py) stops them first, "
  "with one line naming the lost process: at once when a process dies, after half this time "
  "when one hangs or its host vanishes.",
)
flags.DEFINE_bool(
  "peer_watch",
  True,
  "Multi-process runs: keep ega_jax's TCP watch between process 0 (an ephemeral port on "
  "the coordinator's host) and the others. Turn off where that port cannot be reached; "
  "a lost process is then noticed by a failing collective or jax.distributed's heartbeat.",
)
flags.register_validator(
  "heartbeat_timeout_s", lambda seconds: seconds >= 10, "--heartbeat_timeout_s must be >= 10."
)
flags.mark_flags_as_required(["config", "workdir"])


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (its chips appear as /dev/accel* or /dev/vfio/N)."""
  import glob

  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def launched_as_several_processes() -> bool:
  """True on a Cloud TPU VM / pod slice (GKE or gcloud) or a multi-task SLURM job.

  On TPU VMs jax.distributed.initialize() finds the other workers itself (from
  the metadata server, or TPU_WORKER_HOSTNAMES on GKE) and also works on a
  single host, so any TPU VM counts.
  """
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or on_cloud_tpu_vm():
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def initialize_distributed() -> None:
  import jax

  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id as well.")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s,
    )
  elif launched_as_several_processes():
    jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)


def hide_accelerators_from_tensorflow() -> None:
  """TF is only used for TFDS preparation and summaries; keep it off the GPU."""
  try:
    import tensorflow as tf
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")


class _DropLibraryChatter:
  """absl log filter: keeps orbax's and grain's warnings, drops their INFO lines.

  orbax logs a dozen INFO lines per checkpoint, which would bury the
  training progress.
  """

  NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/")

  def filter(self, record) -> bool:
    import logging as std_logging

    if record.levelno >= std_logging.WARNING:
      return True
    return not any(part in record.pathname for part in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  initialize_distributed()
  hide_accelerators_from_tensorflow()

  import jax
  from ega_jax import config as config_lib
  from ega_jax import peer_watch
  from ega_jax import train

  logging.info(
    "JAX process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  watch = None
  if FLAGS.peer_watch:
    watch = peer_watch.start(FLAGS.workdir, silence_limit_s=FLAGS.heartbeat_timeout_s / 2)
  # Every process stops the same way on these (same config, replicated losses):
  # a goodbye first, so that the others do not report this process as lost.
  say_goodbye = watch.finish if watch else lambda: None
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_lib.UserInputError as e:
    # A user mistake: one sentence, no traceback.
    say_goodbye()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except config_lib.NonFiniteError as e:
    say_goodbye()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() > 1 and peer_watch.lost_a_peer(e):
      peer_watch.exit_for_a_lost_collective(
        e, jax.process_index(), jax.process_count(), FLAGS.workdir
      )
    raise
  say_goodbye()
  if summary.get("preempted"):
    print(summary["message"], file=sys.stderr)
    return
  logging.info("Done: %s", summary)


def run() -> None:
  """Console-script entry point (ega-train)."""
  from ega_jax import cli, host_memory

  host_memory.reexec_with_malloc_tuning()
  app.run(main, flags_parser=cli.parse_flags_or_exit)


if __name__ == "__main__":
  run()
