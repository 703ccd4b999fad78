"""ega_jax: Embedding Graph Alignment (EGA) knowledge distillation in JAX/Flax.

The Python API (names load on first use, so `import ega_jax` stays light):

  config = ega_jax.get_config("fashion_mnist")          # a shipped config, or a path
  summary, variables = ega_jax.distill(config, "runs/ega")
  module, variables, meta = ega_jax.load_student("exported/")
  teacher, teacher_variables, teacher_meta = ega_jax.load_teacher("teachers/clip_vit_b32")
  student = ega_jax.create_student("resnet8x4", num_classes=100)
  loss = ega_jax.losses.ega_loss(teacher_emb, student_emb, 0.8, 0.24)

See docs/python_api.md.
"""

__version__ = "0.1.0"

# name -> (module, attribute); attribute None means the module itself.
_API = {
  "distill": ("ega_jax.api", "distill"),
  "get_config": ("ega_jax.api", "get_config"),
  "train_and_evaluate": ("ega_jax.train.loop", "train_and_evaluate"),
  "load_student": ("ega_jax.export", "load_student"),
  "export_student": ("ega_jax.api", "export_student"),
  "evaluate": ("ega_jax.evaluate", "evaluate"),
  "load_teacher": ("ega_jax.models.teachers", "load_teacher"),
  "create_student": ("ega_jax.models.students", "create_student"),
  "STUDENT_NAMES": ("ega_jax.models.students", "STUDENT_NAMES"),
  "DistilledStudent": ("ega_jax.models.distilled", "DistilledStudent"),
  "normalize_images": ("ega_jax.models.preprocess", "normalize_images"),
  "losses": ("ega_jax.losses", None),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
  if name not in _API:
    raise AttributeError(f"module 'ega_jax' has no attribute {name!r}")
  import importlib

  module_name, attribute = _API[name]
  module = importlib.import_module(module_name)
  return module if attribute is None else getattr(module, attribute)
