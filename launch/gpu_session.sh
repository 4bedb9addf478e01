#!/usr/bin/env bash
# One lent-GPU session in one command: environment, the GPU attention parity tests, the train-step MFU benchmark
# (Qwen3-0.6B/1.7B shapes), a per-op profile of the 0.6B step, variants side by side (the dense segment mask,
# rows of four packed samples with either, no remat), then a profile of the 1.7B step.
#
#   bash launch/gpu_session.sh [SECONDS] [OUT_DIR]      # SECONDS: the whole script's budget (default 400)
#
# It runs from the repository root on a machine whose Python already has a CUDA jax, flax and optax (the
# device image has jax 0.11.2; pyproject pins 0.10.2 for CPU CI, so the package is put on PYTHONPATH as a copy
# instead of pip-installed; the scripts it runs import nothing the image lacks). Each stage gets the time that
# is left minus a reserve for the later ones, so a slow compile cannot eat the whole budget. Every log, the
# profiles' JSON summaries, HLO and traces are packed into OUT_DIR/gpu_session.tgz after each stage (the device
# tool brings back a few files only); OUT_DIR/summary.log is the stage list.
set -u
budget=${1:-400}
out=${2:-${OUT:-/tmp/gpu_session}}
logs=/tmp/gpu_session_logs
rm -rf "$logs" && mkdir -p "$out" "$logs"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
export PYTHONUNBUFFERED=1
pack() {  # the tool brings back files of at most 16 MiB: drop the raw traces if they would pass that
  tar czf "$out/gpu_session.tgz" -C "$logs" . 2>/dev/null
  [ "$(stat -c %s "$out/gpu_session.tgz")" -gt 15000000 ] \
    && tar czf "$out/gpu_session.tgz" --exclude='*.xplane.pb.gz' -C "$logs" .
  cp "$logs/summary.log" "$out/summary.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, jax, flax, optax; from jax._src.lib import cuda_versions as c
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'cudnn', c.cudnn_get_version() if c else None, jax.devices())" 2>&1
} | tee "$logs/env.log"

rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r orchestra_jax /tmp/pkg/ && rm -rf /tmp/pkg/orchestra_jax/kernels \
  && cp -r kernels /tmp/pkg/orchestra_jax/kernels || exit 1
export PYTHONPATH=/tmp/pkg

stage() {  # stage NAME RESERVE COMMAND...: run with the time left minus RESERVE, log it; returns its exit code
  local name=$1 reserve=$2; shift 2
  local t=$(($(left) - reserve))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $(left) s left" | tee -a "$logs/summary.log"; return 99; fi
  echo "== $name ($t s): $*" | tee -a "$logs/summary.log"
  timeout "$t" "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc at $(($(date +%s) - start)) s" | tee -a "$logs/summary.log"
  pack
  return "$rc"
}

# cuDNN attention against plain attention (forward and gradients): the packed layout (segment offsets), a batch
# over its segment bound (the XLA blocks) and the dense mask. The timings use the best path that passed.
stage gpu_tests $((budget * 80 / 100)) env JAX_PLATFORMS=cuda python3 -P -m pytest -q -rA -p no:cacheprovider \
  -m gpu tests/models/test_transformer.py
attention=(--attention auto)
mask=(--override orchestra_jax.models.transformer.CUDNN_MAX_SEGMENTS=0)
if ! grep -q "PASSED.*cudnn-packed-bf16" "$logs/gpu_tests.log"; then
  if grep -q "PASSED.*cudnn-mask-bf16" "$logs/gpu_tests.log"; then attention+=("${mask[@]}"); mask=(); else
    attention=(--attention xla); mask=(); fi
fi
echo "== attention for the timings: ${attention[*]}" | tee -a "$logs/summary.log"

stage train_default $((budget * 62 / 100)) python3 launch/gpu_train_bench.py "${attention[@]}"
stage profile_06 $((budget * 45 / 100)) python3 launch/profile_step.py --model qwen3-0.6b --out "$logs/profile_06" \
  --top 40 "${attention[@]}"
variant() {  # variant NAME RESERVE FLAGS...: the step with the chosen attention and FLAGS
  local name=$1 reserve=$2; shift 2
  stage "variant_$name" "$reserve" python3 launch/gpu_train_bench.py "${attention[@]}" "$@"
}
[ ${#mask[@]} -gt 0 ] && variant dense_mask $((budget * 35 / 100)) --models qwen3-0.6b "${mask[@]}"
variant four_per_row $((budget * 28 / 100)) --models qwen3-0.6b --samples-per-row 4
[ ${#mask[@]} -gt 0 ] && variant four_per_row_dense_mask $((budget * 21 / 100)) --models qwen3-0.6b \
  --samples-per-row 4 "${mask[@]}"
variant remat_none $((budget * 8 / 100)) --remat none
stage profile_17 0 python3 launch/profile_step.py --model qwen3-1.7b --out "$logs/profile_17" --top 40 \
  "${attention[@]}"

echo "== summary"
cat "$logs/summary.log"
grep -h '"model"' "$logs"/train_*.log "$logs"/variant_*.log 2>/dev/null | cut -c1-560
pack
