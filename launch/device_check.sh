#!/usr/bin/env bash
# The one prepared accelerator check (docs/performance.md, "The accelerator check").
#
#   launch/device_check.sh prepare        # here, where pip reaches PyPI: the wheels the
#                                         # GPU image lacks, into .whl/ (git-ignored)
#   launch/device_check.sh run OUT_DIR    # on the GPU machine: installs .whl/ if present,
#                                         # runs everything, writes JSON under OUT_DIR
#
# `run` times benchmarks.step for clip_vit_b32 -> resnet8x4 on CIFAR-100 shapes (synthetic
# uint8 batches, random weights: no dataset or checkpoint needed) at global batch 256 and
# 1,024, in bfloat16 and float32. Each setting measures, in one process and in alternating
# rounds: the live step (images/s, MFU against the device's measured N x N matmul peak in
# that dtype), the step fed cached teacher embeddings (--teacher_cache), and the PyTorch
# step on the same device (--compare_torch). One JSON and one log per setting, and
# summary.json with the numbers the targets are judged by. The whole run stops itself
# after DEVICE_CHECK_BUDGET_S (default 480 s): a setting that would start with less than
# 30 s left is skipped and listed as such.
#
# Overrides, for a quick CPU rehearsal (tests/test_benchmark.py runs one):
#   DEVICE_CHECK_BATCHES="256 1024"  DEVICE_CHECK_DTYPES="bfloat16 float32"
#   DEVICE_CHECK_STEPS=10  DEVICE_CHECK_ARGS="extra benchmarks.step flags"  PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
PYTHON=${PYTHON:-python3}

# The packages requirements.txt names that the GPU image (Python 3.12, jax, flax, optax,
# orbax, torch) does not hold, at requirements.txt's versions, plus grain's portpicker.
missing_packages() {
  for name in grain array-record ml-collections; do
    grep -E "^${name}==" requirements.txt
  done
  echo "portpicker==1.6.0"
}

case "${1:-}" in
  prepare)
    mkdir -p "$WHEELS"
    if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
      echo '/.whl/' >>.git/info/exclude
    fi
    # shellcheck disable=SC2046
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" $(missing_packages)
    ls -l "$WHEELS"
    echo "Now, on the GPU machine: launch/device_check.sh run OUT_DIR (carry .whl)."
    ;;
  run)
    OUT=${2:?usage: launch/device_check.sh run OUT_DIR}
    mkdir -p "$OUT"
    if ! "$PYTHON" -c "import grain, ml_collections, portpicker" 2>/dev/null; then
      if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "error: $PYTHON lacks grain/ml_collections and $WHEELS/ holds no wheels; run" \
          "'launch/device_check.sh prepare' where pip reaches PyPI and carry $WHEELS." >&2
        exit 2
      fi
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ega_device_site "$WHEELS"/*.whl
      export PYTHONPATH="/tmp/ega_device_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    "$PYTHON" -c "import grain, ml_collections, jax; print('jax', jax.__version__, jax.devices())" \
      | tee "$OUT/devices.txt"
    (nvidia-smi || true) >"$OUT/nvidia-smi.txt" 2>&1
    budget=${DEVICE_CHECK_BUDGET_S:-480}
    deadline=$((SECONDS + budget))
    skipped=()
    for dtype in ${DEVICE_CHECK_DTYPES:-bfloat16 float32}; do
      for batch in ${DEVICE_CHECK_BATCHES:-256 1024}; do
        name="step_${dtype}_b${batch}"
        left=$((deadline - SECONDS))
        if [ "$left" -lt 30 ]; then
          skipped+=("$name")
          continue
        fi
        echo "== $name ($left s left)"
        # shellcheck disable=SC2086
        if ! timeout "$left" "$PYTHON" -m benchmarks.step --config=configs/cifar100.py \
          --config.teacher.arch=clip_vit_b32 --config.student.arch=resnet8x4 \
          --config.batch_size="$batch" --config.dtype="$dtype" \
          --steps="${DEVICE_CHECK_STEPS:-10}" --warmup=2 --peak_matmul_size=8192 \
          --compare_torch --teacher_cache ${DEVICE_CHECK_ARGS:-} \
          --json="$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
          echo "$name failed; the end of its log:"
          tail -20 "$OUT/$name.log"
        fi
      done
    done
    "$PYTHON" - "$OUT" "${skipped[@]}" <<'EOF'
import glob, json, os, sys

out, skipped = sys.argv[1], sys.argv[2:]
settings = {}
for path in sorted(glob.glob(os.path.join(out, "step_*.json"))):
  with open(path) as f:
    report = json.load(f)
  settings[os.path.basename(path)[: -len(".json")]] = {
    "device_kind": report["jax"]["device_kind"],
    "batch_size": report["batch_size"],
    "dtype": report["dtype"],
    "images_per_sec": report["images_per_sec"],
    "mfu": report["mfu"],
    "peak_matmul_flops_per_sec": report["peak_matmul"]["flops_per_sec"],
    "cached_images_per_sec": report["jax"]["cached"]["images_per_sec"],
    "torch_images_per_sec": report["torch"]["images_per_sec"],
    "jax_over_torch_images_per_sec": report["jax_over_torch_images_per_sec"],
    "cached_over_torch_cached_images_per_sec": report["cached_over_torch_cached_images_per_sec"],
  }
summary = {"settings": settings, "skipped": skipped,
           "targets": {"bfloat16_mfu": 0.40, "jax_over_torch_images_per_sec": 1.3}}
with open(os.path.join(out, "summary.json"), "w") as f:
  json.dump(summary, f, indent=2)
for name, s in settings.items():
  print(f"{name}: {s['images_per_sec']:.0f} img/s, MFU {100 * s['mfu']:.1f} %, "
        f"cached {s['cached_images_per_sec']:.0f} img/s, JAX/PyTorch "
        f"{s['jax_over_torch_images_per_sec']:.2f}x live, "
        f"{s['cached_over_torch_cached_images_per_sec']:.2f}x cached")
print("skipped:", ", ".join(skipped) or "none")
EOF
    ;;
  *)
    echo "usage: launch/device_check.sh prepare | run OUT_DIR" >&2
    exit 2
    ;;
esac
