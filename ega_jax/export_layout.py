"""The released PyTorch layout of an exported student (see `ega_jax.export`'s docstring).

The Flax students are named so that a variable's path joined by '.' is its
RepDistiller state_dict key; these functions apply that rule and assemble the
dict the released `train_student.py` saves.
"""

import numpy as np

# Flax/torch leaf names of the students' naming rule (kernels are transposed too).
_TORCH_LEAF_NAMES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
# The released EGA CIFAR ResNets (models/resnet.py) have no final fc.
_RELEASED_WITHOUT_FC = ("resnet",)
_CIFAR_RESNET_FC = "fc"


def flat_items(tree):
  """(path tuple, leaf) pairs of a nested dict."""
  from flax import traverse_util

  return traverse_util.flatten_dict(tree).items()


def torch_state_dict(flax_params, flax_batch_stats) -> dict[str, np.ndarray]:
  """A Flax module's params and batch_stats -> PyTorch state_dict arrays, by the naming rule.

  Conv kernels go HWIO -> OIHW and Dense kernels (in, out) -> (out, in);
  BatchNorm layers also get `num_batches_tracked` (0, which eval mode never reads).
  """
  state = {}
  for collection in (flax_params, flax_batch_stats):
    for path, value in flat_items(collection):
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      state[".".join(path[:-1] + (_TORCH_LEAF_NAMES[path[-1]],))] = np.ascontiguousarray(value)
  for path, _ in flat_items(flax_batch_stats):
    if path[-1] == "mean":
      state[".".join(path[:-1] + ("num_batches_tracked",))] = np.zeros((), np.int64)
  return state


def released_layout(variables, meta) -> dict:
  """The dict the released train_student.py saves, as NumPy arrays (see the module docstring)."""
  backbone = torch_state_dict(variables["params"]["backbone"], variables["batch_stats"]["backbone"])
  if meta["arch"].startswith(_RELEASED_WITHOUT_FC):
    backbone = {
      key: value for key, value in backbone.items() if not key.startswith(_CIFAR_RESNET_FC + ".")
    }
  head = variables["params"]["head"]
  layer = {}
  for flax_name, torch_name in (("embed", "fit_dim_Net"), ("classifier", "cl_Net")):
    dense = head[flax_name]["Dense_0"]
    layer[f"{torch_name}.weight"] = np.ascontiguousarray(np.asarray(dense["kernel"]).T)
    layer[f"{torch_name}.bias"] = np.asarray(dense["bias"])
  best_acc = meta.get("eval_top1")
  return {
    "model": backbone,
    "layer": layer,
    "epoch": int(meta["epoch"]),
    "best_acc": float(best_acc) if best_acc is not None else None,
  }


def pytorch_file_name(meta) -> str:
  which = meta["which"]
  suffix = {"best": "best", "latest": "last"}.get(which, f"step{meta['step']}")
  return f"{meta['arch']}_{suffix}.pth"
