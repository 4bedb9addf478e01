#!/usr/bin/env bash
# One lent-GPU session in one command: environment, the GPU parity tests, the train-step MFU benchmark
# (Qwen3-0.6B/1.7B shapes), train-step variants side by side, then a Pallas log-prob block-size sweep.
#
#   bash launch/gpu_session.sh [SECONDS] [OUT_DIR]      # SECONDS: the whole script's budget (default 400)
#
# It runs from the repository root on a machine whose Python already has a CUDA jax, flax and optax (the
# device image has jax 0.11.2; pyproject pins 0.10.2 for CPU CI, so the package is put on PYTHONPATH as a copy
# instead of pip-installed). Wheels in .whl/ (tyro and its needs, for kernels/gpu_bench.py) are installed to
# /tmp/site first. Each stage gets the time that is left minus a reserve for the later ones, so a slow compile
# cannot eat the whole budget; every stage's output is kept under OUT_DIR (default $OUT, else /tmp/gpu_session).
set -u
budget=${1:-400}
out=${2:-${OUT:-/tmp/gpu_session}}
mkdir -p "$out"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1
} | tee "$out/env.log"

rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r orchestra_jax /tmp/pkg/ && rm -rf /tmp/pkg/orchestra_jax/kernels \
  && cp -r kernels /tmp/pkg/orchestra_jax/kernels || exit 1
export PYTHONPATH=/tmp/pkg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/pkg:/tmp/site
fi

stage() {  # stage NAME RESERVE COMMAND...: run with the time left minus RESERVE, log to OUT; returns its exit code
  local name=$1 reserve=$2; shift 2
  local t=$(($(left) - reserve))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$out/summary.log"; return 99; fi
  echo "== $name ($t s): $*" | tee -a "$out/summary.log"
  timeout "$t" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc at $(($(date +%s) - start)) s" | tee -a "$out/summary.log"
  return "$rc"
}

# cuDNN attention against plain attention (forward and gradients); if it fails, the timings use the XLA path.
attention=auto
stage gpu_tests $((budget * 85 / 100)) env JAX_PLATFORMS=cuda python3 -P -m pytest -q -p no:cacheprovider -m gpu \
  tests/models/test_transformer.py || attention=xla
stage train_default $((budget * 6 / 10)) python3 launch/gpu_train_bench.py --attention "$attention"
stage train_variants $((budget / 5)) bash -c 'for v in "--attention xla" "--remat dots" "--remat none" \
  "--logprob-impl pallas"; do python3 launch/gpu_train_bench.py --models qwen3-0.6b --attention '"$attention"' $v; done'
stage kernel_blocks 0 bash -c 'for b in "64 128 64" "128 128 64" "64 256 64" "128 256 32"; do set -- $b
  echo "blocks (T, V, K): $b"; python3 -P -m orchestra_jax.kernels.gpu_bench --tokens 8192 --hidden 1024 --skip-naive --block-t $1 --block-v $2 \
    --block-k $3 | grep -v "^\[{"; done'

echo "== summary"
cat "$out/summary.log"
grep -h '"model"' "$out"/train_*.log 2>/dev/null
grep -h -E '^blocks|^ +[0-9]+ +[0-9]+ [|]' "$out/kernel_blocks.log" 2>/dev/null
