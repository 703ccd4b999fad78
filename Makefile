# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: test test-slow test-all lint format demo compare venv fashion-mnist clean demo-clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
	@# oneDNN's convolution kernels for XLA:CPU, compiled once (ega_jax/models/onednn.py).
	$(PY) -c "from ega_jax.models import onednn; print(onednn.register())"
	touch $(STAMP)

# Debian's dataset-fashion-mnist when apt is usable as root; otherwise the
# code falls back to TFDS (which needs network access to download).
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  echo "Fashion-MNIST: apt install failed; falling back to TFDS"; \
	else \
	  echo "Fashion-MNIST: apt not usable; falling back to TFDS"; \
	fi

# Style (ruff: pyproject.toml's [tool.ruff]); `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

# `make test` (what CI runs): lint + every test not marked `slow`, which keeps
# each promise the project makes checked (released-step parity, 1 vs 8 devices,
# exact resume, SIGTERM) within the project's ~20 min aim on 2 cores.
# `make test-slow` runs the rest (full-size converter releases, two-process
# faults, kill -9 at random moments, the benchmark CLIs, ...); `make test-all`
# runs both: run it before landing a change to training, checkpoints or faults.
# Test files run in parallel (pytest-xdist), one file per worker at a time so a
# module's shared fixture is built once; most of a test's time is XLA compiling,
# which is single-threaded, so two workers on two cores cut the wall time.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --maxprocesses=4

test: lint fashion-mnist
	$(PYTEST) -m "not slow" tests

test-slow: $(STAMP) fashion-mnist
	$(PYTEST) -m slow tests

test-all: lint fashion-mnist
	$(PYTEST) tests

# The main job on the offline default: the shipped SimCLR teacher (PyTorch) ->
# conversion -> embedding cache -> EGA distillation (+ a CE-only baseline) on
# Fashion-MNIST with 3 labels per class and with every label, then a table.
demo: $(STAMP) fashion-mnist
	$(PY) -m experiments.demo

# Every distiller on the demo teacher in the demo's headline setting, 3 seeds
# (30 runs, about 30 min on 2 cores; run `make demo` first). Output: demo_out/compare.
compare: $(STAMP) fashion-mnist
	$(PY) -m experiments.compare --config=configs/fashion_mnist_few_labels.py \
	  --teacher=demo_out/teacher/flax --seeds=0,1,2 -- --config.teacher.cache=demo_out/teacher/cache

demo-clean:
	rm -rf demo_out

clean:
	rm -rf $(VENV) .pytest_cache
