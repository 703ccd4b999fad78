"""Default hyperparameters: the released EGA recipe (CIFAR-100, CLIP ViT-B/32 -> resnet8x4).

Every field can be overridden from the command line, e.g.
  python -m ega_jax.main --config=configs/cifar100.py --workdir=/tmp/run \
      --config.distill.method=rkd --config.batch_size=128
"""

import ml_collections

from ega_jax import losses


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "cifar100"
  # Where the data are (docs/data.md): a TFDS data_dir holding the prepared
  # (array_record) dataset, which may instead hold torchvision's cifar-100-python/ or
  # cifar-10-batches-py/, or fashion-mnist/*.gz; for name="image_folder" the folder
  # holding train/<class>/ and test/<class>/. None = TFDS's default.
  config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  # image_folder only: the side (pixels) its images are resized to.
  config.dataset.image_size = 32
  # image_folder only: per-channel (R, G, B) mean and std on a 0..1 scale, e.g.
  # --config.dataset.mean="(0.5,0.5,0.5)"; None = computed once from the train
  # images and cached in <data_dir>/ega_jax_stats.json.
  config.dataset.mean = ml_collections.FieldReference(None, field_type=tuple)
  config.dataset.std = ml_collections.FieldReference(None, field_type=tuple)
  # grain worker processes per host (0 = read in the main process).
  config.dataset.worker_count = 0
  # > 0: use only the first that many train / evaluation examples (quick runs).
  config.dataset.max_train_examples = -1
  config.dataset.max_eval_examples = -1
  # Label-efficient mode: > 0 keeps only this many train labels (class-balanced,
  # fixed by config.seed, recorded in the workdir's labelled.json); every image
  # still reaches the student and the teacher. -1: every label is known.
  config.dataset.num_labelled = -1
  # With num_labelled > 0: the share of every batch drawn from the labelled
  # images (the rest from all images). CE-only runs use the labelled images alone.
  config.dataset.labelled_share = 0.5

  config.teacher = ml_collections.ConfigDict()
  config.teacher.arch = "clip_vit_b32"
  # Directory written by ega-convert (holds teacher.json).
  config.teacher.checkpoint = ""
  # Directory written by ega-cache: the teacher's embeddings of
  # cached views are read from it instead of running the teacher in every
  # step ('' = run the teacher live).
  config.teacher.cache = ""

  # 'independent': the teacher sees its own random crop/flip (released code);
  # 'same': the teacher sees the student's augmented view.
  config.teacher_view = "independent"

  config.student = ml_collections.ConfigDict()
  config.student.arch = "resnet8x4"

  config.distill = ml_collections.ConfigDict()
  # One of ega_jax.losses.DISTILL_METHODS ('none' = cross-entropy only).
  config.distill.method = "ega"
  config.distill.gamma = 1.0  # cross-entropy weight
  config.distill.alpha = 0.0  # KD (logit) weight
  config.distill.beta = 1.0  # distillation-loss weight
  # Every loss hyperparameter (EGA node/edge weights, KD temperature, RKD, PKT,
  # NCE/CCL, IRG and CRD settings) with its default from its one home,
  # ega_jax.losses.DEFAULT_HPARAMS (documented there); e.g.
  # --config.distill.node_weight=0.8 --config.distill.pearson_eps=1e-8.
  for key, value in losses.DEFAULT_HPARAMS.items():
    config.distill[key] = value
  # False (released): the teacher head learns from its own cross-entropy only
  # and the distillation gradient never reaches it. True: it also receives
  # beta * distillation-loss gradients.
  config.distill.train_teacher_head_jointly = False
  # A graph loss (ega, rkd, pkt, irg, nce, ccl) on n devices: 'replicated'
  # (every device computes the whole loss from the gathered embeddings),
  # 'sharded' (each device its B/n rows of the graph against all B columns,
  # the sums assembled with psum; the same loss to float rounding), or 'auto':
  # sharded when n > 1, which was faster at every batch measured
  # (docs/performance.md, benchmarks/graph_rows.py), and the whole graph on one
  # device, where there is nothing to split.
  config.distill.graph_rows = "auto"

  config.feature_dim = 256
  config.batch_size = 64  # global, across all devices and hosts
  config.eval_batch_size = 256  # global
  config.num_epochs = 240
  config.num_train_steps = -1  # > 0 overrides num_epochs

  config.learning_rate = 0.05
  config.lr_decay_epochs = (150, 180, 210)
  config.lr_decay_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.teacher_head_learning_rate = 0.01
  config.teacher_head_momentum = 0.9
  config.teacher_head_weight_decay = 5e-4

  # Computation dtype for teacher and student: 'float32' or 'bfloat16'
  # (parameters, optimiser state and losses stay float32).
  config.dtype = "float32"

  config.log_every_steps = 100
  config.eval_every_steps = -1  # <= 0: once per epoch
  config.checkpoint_every_steps = -1  # <= 0: once per epoch
  config.keep_checkpoints = 3
  # True: checkpoints are written in a background thread while training goes
  # on (still published only when complete); False: each save blocks the loop.
  config.async_checkpoints = True
  # A workdir holding checkpoints of another student/method/dataset is refused
  # unless this is True (then those checkpoints and metrics are deleted).
  config.overwrite_workdir = False
  # What to do with a non-finite loss or gradient: 'skip' the update (counted
  # in train/skipped_steps) or 'stop' the run.
  config.nonfinite_policy = "skip"
  # Tests only: > 0 makes the distillation loss NaN at that (1-based) step.
  config.debug_nan_at_step = -1
  # Draw the EGA graphs of a fixed evaluation batch at each evaluation.
  config.graph_pictures = True
  config.graph_picture_batch = 64

  config.seed = 0
  return config
