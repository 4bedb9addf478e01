#!/usr/bin/env bash
# One lent-GPU session in one command: environment, the GPU attention parity tests, the train-step MFU benchmark
# (Qwen3-0.6B/1.7B shapes, remat dots) with the 0.6B step's cuDNN attention call picked on the host and, in turns
# in the same process, on the device; a per-op profile of the 0.6B step; rows of four packed samples both ways;
# a baseline commit's 0.6B step when one is given; the 0.6B step with remat full; long rows through the XLA
# attention, tiles against blocks.
#
#   bash launch/gpu_session.sh [SECONDS] [OUT_DIR]      # SECONDS: the whole script's budget (default 400)
#   git archive -o base.tar BASE_COMMIT orchestra_jax kernels   # first, for side-by-side timings (BASE_TAR)
#   SMOKE=1 bash launch/gpu_session.sh 600 OUT_DIR       # on a CPU: every stage on the tiny model, small shapes
#
# It runs from the repository root on a machine whose Python already has a CUDA jax, flax and optax (the
# device image has jax 0.11.2; pyproject pins 0.10.2 for CPU CI, so the package is put on PYTHONPATH as a copy
# instead of pip-installed; the scripts it runs import nothing the image lacks). Each stage gets the time that
# is left minus a reserve for the later ones, so a slow compile cannot eat the whole budget. Every log, the
# profiles' JSON summaries, HLO and traces are packed into OUT_DIR/gpu_session.tgz after each stage (the device
# tool brings back a few files only); OUT_DIR/summary.log is the stage list. With BASE_TAR (default base.tar,
# when present) launch/compare_code.py times the baseline's 0.6B step against this tree's.
set -u
budget=${1:-400}
out=${2:-${OUT:-/tmp/gpu_session}}
work=${GPU_SESSION_WORK:-/tmp}  # scratch: the package copy and the logs
logs=$work/gpu_session_logs
if [ -n "${SMOKE:-}" ]; then  # a check of this script on any machine, before device time is spent on it
  m06=qwen3-tiny m17=qwen3-tiny
  shape=(--batch 2 --seq-len 64) bench_quick=(--steps 1 --matmul-n 256) profile_quick=(--steps 1 --warmup 1)
else
  m06=qwen3-0.6b m17=qwen3-1.7b
  shape=() bench_quick=() profile_quick=()
fi
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

pkg=$work/pkg  # the installed layout (kernels/ inside the package), as compare_code.py builds it
rm -rf "$pkg" && python3 -c "import sys; sys.path.insert(0, 'launch'); from pathlib import Path
from compare_code import package; package(Path('.'), Path(sys.argv[1]))" "$pkg" || exit 1
export PYTHONPATH=$pkg
base_tar=${BASE_TAR:-base.tar}

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

# cuDNN attention against plain attention (forward and gradients): each call `packed_layout` picks (plain causal
# rows, segment offsets, the XLA blocks past their bound, the dense mask). The timings use the best that passed.
stage gpu_tests $((budget * 85 / 100)) env JAX_PLATFORMS=cuda python3 -P -m pytest -q -rA -p no:cacheprovider \
  -m gpu tests/models/test_transformer.py
attention=(--attention auto)
if ! grep -q "PASSED.*cudnn-packed-bf16" "$logs/gpu_tests.log" \
  || ! grep -q "PASSED.*cudnn-rows-bf16" "$logs/gpu_tests.log"; then
  attention=(--attention xla)
fi
echo "== attention for the timings: ${attention[*]}" | tee -a "$logs/summary.log"

# Each 0.6B process spends 45-55 s compiling (H100, session 15): a stage needs about 75 s, one with --versus
# (two steps compiled, timed in turns in one process) about 130 s. Stages that finish early leave their time to
# the later ones; the last ones are skipped when the budget runs out. Remat dots: the best 0.6B figure so far.
switch=(--versus orchestra_jax.rl.train_step.HOST_ATTENTION_LAYOUT=False)  # the call picked on the device
bench=(python3 launch/gpu_train_bench.py "${attention[@]}" "${shape[@]}" "${bench_quick[@]}" --remat dots)
stage train_06 $((budget * 45 / 100)) "${bench[@]}" --models "$m06" --steps 6 "${switch[@]}"
stage train_17 $((budget * 25 / 100)) "${bench[@]}" --models "$m17"
stage profile_06 0 python3 launch/profile_step.py --model "$m06" --out "$logs/profile_06" --top 40 --remat dots \
  "${attention[@]}" "${shape[@]}" "${profile_quick[@]}"
stage four_per_row 0 "${bench[@]}" --models "$m06" --samples-per-row 4 --steps 6 "${switch[@]}"
[ -f "$base_tar" ] && stage compare_base 0 python3 launch/compare_code.py "$base_tar" --rounds 1 -- \
  "${attention[@]}" "${shape[@]}" "${bench_quick[@]}" --remat dots --models "$m06"  # the baseline, then this tree
stage train_06_full 0 python3 launch/gpu_train_bench.py "${attention[@]}" "${shape[@]}" "${bench_quick[@]}" \
  --models "$m06"  # remat full, the default
# Long rows through the XLA attention: square tiles (from TILED_FROM tokens) against the unrolled query blocks,
# in turns (measured on the CPU only so far: 1 x 8192 1.24x faster with the tiles, session 23).
long_row=(--batch 1 --seq-len 8192 --steps 3)
[ -n "${SMOKE:-}" ] && long_row=(--batch 1 --seq-len 64 --steps 1 --override orchestra_jax.models.transformer.TILED_FROM=32)
stage long_rows_xla 0 python3 launch/gpu_train_bench.py --attention xla "${bench_quick[@]}" --remat dots \
  --models "$m06" "${long_row[@]}" --versus orchestra_jax.models.transformer.TILED_FROM=1000000

echo "== summary"
cat "$logs/summary.log"
for f in "$logs"/*.log; do grep -hE '"model"|"speedup_median"' "$f" | sed "s|^|$(basename "$f" .log): |" | cut -c1-600; done
pack
