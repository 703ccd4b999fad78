"""Command-line plumbing shared by the entry points: config files by name, one-line flag errors.

`--config` takes a path to a config file (`configs/cifar100.py`, optionally
`:ARG`) or the name of a config shipped in the package (`cifar100`,
`fashion_mnist`, ...: the files of `ega_jax/configs/`), so an installed
`ega-train --config=fashion_mnist` needs no checkout. A flag mistake -- a
config file that does not exist, takes no argument, or an override of a field
the config does not have (`--config.distill.metod=rkd`) -- is one sentence
naming it and what would be valid, not a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys

PACKAGED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class FlagError(ValueError):
  """A command-line mistake; the message is the one line to print."""


def packaged_config_names() -> list[str]:
  """Names of the config files shipped in ega_jax/configs (without '.py')."""
  if not os.path.isdir(PACKAGED_CONFIG_DIR):
    return []
  return sorted(
    name[:-3]
    for name in os.listdir(PACKAGED_CONFIG_DIR)
    if name.endswith(".py") and not name.startswith("_") and name != "default.py"
  )


def resolve_config_path(value: str) -> str:
  """'configs/x.py[:arg]' stays as it is; a shipped name 'x[:arg]' becomes its file's path."""
  path, sep, argument = value.partition(":")
  if os.path.isfile(path):
    return value
  name = path[:-3] if path.endswith(".py") else path
  packaged = os.path.join(PACKAGED_CONFIG_DIR, f"{os.path.basename(name)}.py")
  # A bare name, or the checkout's configs/NAME.py run from elsewhere.
  shipped_path = os.sep not in name or os.path.dirname(name) == "configs"
  if shipped_path and os.path.isfile(packaged):
    return packaged + sep + argument
  raise FlagError(
    f"--config={value}: {path} does not exist; give a path to a config file or one of the "
    f"shipped configs: {', '.join(packaged_config_names())}."
  )


def load_config_file(value: str):
  """The ConfigDict of '--config=PATH[:ARG]' (as ml_collections' config_flags loads it)."""
  path, _, argument = value.partition(":")
  spec = importlib.util.spec_from_file_location("_ega_jax_checked_config", path)
  if spec is None or spec.loader is None:
    raise FlagError(f"--config={value}: {path} is not a Python file (a config is a .py file).")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as error:
    raise FlagError(
      f"--config={value}: {path} is not valid Python ({error.msg}, line {error.lineno})."
    )
  if not hasattr(module, "get_config"):
    raise FlagError(f"--config={value}: {path} defines no get_config() function.")
  arguments = (argument,) if argument else ()
  try:
    inspect.signature(module.get_config).bind(*arguments)
  except TypeError as error:
    given = f"the argument {argument!r}" if argument else "no argument"
    raise FlagError(
      f"--config={value}: {path}'s get_config() cannot take {given} ({error}); "
      + ("drop ':" + argument + "' from --config." if argument else "add one as --config=PATH:ARG.")
    ) from error
  return module.get_config(*arguments)


def check_override(config, dotted: str) -> None:
  """Raises FlagError when `--config.<dotted>` names no field of `config`."""
  node, walked = config, "config"
  for part in dotted.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      hint = f"did you mean {', '.join(f'{walked}.{c}' for c in close)}? " if close else ""
      raise FlagError(
        f"--config.{dotted}: {walked} has no field {part!r}; {hint}"
        f"valid fields of {walked}: {', '.join(sorted(keys)) or 'none (it is a value)'}."
      )
    node, walked = node[part], f"{walked}.{part}"


def _flag_value(argv: list[str], index: int, name: str) -> tuple[str | None, int]:
  """The value of flag `name` at argv[index] ('--name=V' or '--name V'), and its argv index."""
  argument = argv[index]
  if argument.startswith(f"--{name}="):
    return argument.split("=", 1)[1], index
  if argument == f"--{name}" and index + 1 < len(argv):
    return argv[index + 1], index + 1
  return None, index


def check_config_flags(argv: list[str], flag: str = "config") -> list[str]:
  """argv with a shipped config name resolved to its file; FlagError for a mistake.

  Every `--config.FIELD` override must name a field of the loaded config.
  """
  argv = list(argv)
  config_value = None
  for index in range(len(argv)):
    value, value_index = _flag_value(argv, index, flag)
    if value is not None:
      config_value = resolve_config_path(value)
      argv[value_index] = f"--{flag}={config_value}" if value_index == index else config_value
  if config_value is None:
    return argv
  config = load_config_file(config_value)
  prefix = f"--{flag}."
  for argument in argv:
    if argument.startswith(prefix):
      check_override(config, argument[len(prefix) :].split("=", 1)[0])
  return argv


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl `flags_parser` for app.run: the checks above, then absl's parse; one line on error."""
  from absl import flags

  try:
    argv = check_config_flags(argv)
    return flags.FLAGS(argv)
  except FlagError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as error:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(2)
