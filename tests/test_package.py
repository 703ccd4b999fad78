"""ega_jax as an installed package: the wheel, its console scripts and the Python API example.

The wheel is built from the checkout and installed (without dependencies:
this test's virtualenv has them) into a directory of its own; everything then
runs from a directory outside the checkout, so only the installed files can
be imported.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from run_configs import REPO, needs_fashion_mnist

SCRIPTS = ("ega-train", "ega-convert", "ega-cache", "ega-export", "ega-eval", "ega-plot")


def _run(command, cwd, env, timeout=600):
  result = subprocess.run(
    command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )
  return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(site directory holding the installed wheel, environment that imports only it)."""
  root = tmp_path_factory.mktemp("installed")
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  build = _run(
    pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), REPO],
    cwd=root,
    env=dict(os.environ),
  )
  assert build.returncode == 0, build.stderr[-3000:]
  (wheel,) = os.listdir(root / "dist")
  site = root / "site"
  install = _run(
    pip + ["install", "--no-deps", "--target", str(site), str(root / "dist" / wheel)],
    cwd=root,
    env=dict(os.environ),
  )
  assert install.returncode == 0, install.stderr[-3000:]
  env = dict(os.environ, PYTHONPATH=str(site), OMP_WAIT_POLICY="PASSIVE")
  return site, env


def test_wheel_holds_the_library_configs_and_scripts(installed, tmp_path):
  site, env = installed
  shipped = set(os.listdir(site / "ega_jax" / "configs"))
  assert {"__init__.py", "default.py", "cifar100.py", "fashion_mnist.py"} <= shipped
  # oneDNN's convolution source, compiled on the user's machine on first use.
  assert (site / "ega_jax" / "models" / "onednn_conv.cc").is_file()
  for leftover in ("launch", "experiments", "benchmarks", "tests", "configs"):
    assert not (site / leftover).exists(), leftover
  for script in SCRIPTS:
    assert (site / "bin" / script).is_file(), script
  found = _run([sys.executable, "-c", "import ega_jax; print(ega_jax.__file__)"], tmp_path, env)
  assert found.stdout.strip() == str(site / "ega_jax" / "__init__.py"), found.stderr[-2000:]
  # A shipped config by name; a mistake in it is one line.
  mistake = _run(
    [str(site / "bin" / "ega-train"), "--config=fashion_mnist", "--workdir=w"]
    + ["--config.distill.metod=rkd"],
    tmp_path,
    env,
  )
  assert mistake.returncode == 2
  lines = mistake.stderr.strip().splitlines()
  assert len(lines) == 1 and "did you mean config.distill.method?" in lines[0], lines


@needs_fashion_mnist
def test_python_api_example_trains_exports_and_evaluates_outside_the_checkout(
  installed, converted_resnet18, tmp_path
):
  site, env = installed
  with open(os.path.join(REPO, "docs", "python_api.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)
  assert len(blocks) == 2
  script = "\n".join(blocks).replace("demo_out/teacher/flax", str(converted_resnet18))
  (tmp_path / "example.py").write_text(script)
  example = _run([sys.executable, "example.py"], tmp_path, env, timeout=900)
  assert example.returncode == 0, example.stderr[-4000:]
  assert re.search(r"best top-1 \d+\.\d\d% at step [24]", example.stdout), example.stdout
  workdir = tmp_path / "runs" / "api_demo"
  assert json.loads((workdir / "config.json").read_text())["config"]["student"]["arch"] == "resnet8"

  # The console scripts on that run.
  scores = _run(
    [str(site / "bin" / "ega-eval"), f"--workdir={workdir}", "--json=scores.json"], tmp_path, env
  )
  assert scores.returncode == 0, scores.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert json.loads((tmp_path / "scores.json").read_text())["top1"] == summary["best_top1"]
  exported = _run(
    [str(site / "bin" / "ega-export"), f"--workdir={workdir}", "--output=pt", "--format=pytorch"],
    tmp_path,
    env,
  )
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert os.path.isfile(tmp_path / "pt" / "resnet8_best.pth")
  plotted = _run(
    [str(site / "bin" / "ega-plot"), str(workdir), "--output=curves.png"], tmp_path, env
  )
  assert plotted.returncode == 0, plotted.stderr[-3000:]
  assert os.path.getsize(tmp_path / "curves.png") > 0
