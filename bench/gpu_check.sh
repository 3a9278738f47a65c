#!/usr/bin/env bash
# The GPU check, run through the device tool on one H200. The whole script stays under 5 minutes
# (one device command may run 10, and a rerun must still fit): every step has its own timeout,
# and the timeouts, kill grace included, add up to 298 s.
#   build    the extension against the torch there (torch 2.11 preinstalled)
#   tests    the CUDA tests (tests/test_cuda.py)
#   overhead the overhead benchmark on the 1b preset (bf16), 2 short rounds, diffusers' EMAModel
#            (on the GPU, and its scripts' offload pattern) beside ours, fold 1 and 4
#   many     the many-tensor preset, small tensors packed and not
# Each step writes into $OUT while it runs and appends "name rc seconds" to $OUT/steps.txt when
# it ends, and the benchmark rewrites overhead.json after every mode: a run cut short still
# reports what it got. rc 124 (137) in steps.txt: a step stopped at its timeout.
# The machine has no network: pytest, ninja, psutil and safetensors come from wheels in .wheels/
# (make gpu-wheels), carried along with `carry: [".wheels"]`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1  # output reaches $OUT as it is printed, not when a buffer fills
export MAX_JOBS=16
start=$(date +%s)

# step NAME SECONDS CMD...: runs CMD with its output in $OUT/NAME.txt, at most SECONDS (+2 s for
# a process that ignores SIGTERM).
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout -k 2 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s, total $(( $(date +%s) - start ))s)" \
    | tee -a "$OUT/steps.txt"
  return $rc
}

step env 10 bash -c "nvidia-smi; python -c \"import torch, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda)\"; \
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-300"
if [ -d .wheels ]; then
  step wheels 20 python -m pip install -q --no-index --find-links .wheels \
    pytest ninja psutil safetensors
fi
# One build, in place: the tests and the benchmark run from the repository root, and a failed
# editable install followed by this same build would spend the budget twice.
if ! step build 90 python setup.py build_ext --inplace; then
  tail -40 "$OUT/build.txt"
  exit 1
fi
timeout 8 python -c "from offload_ema import ops; print('kernels:', ops.backend(), ops.isa(), \
'threads', ops.get_num_threads())" 2>&1 | tee -a "$OUT/steps.txt"

step tests 56 python -m pytest -v -x -m cuda tests/test_cuda.py --junitxml="$OUT/junit.xml"
tail -5 "$OUT/tests.txt"

# naive and swa_utils are left out: each costs seconds per 1b step (the synchronous baseline is
# known: ~25x); offload_fold (4 snapshots per pass) gives the host update per snapshot of fold 1
# vs 4 on the same run. The plot needs matplotlib, which the wheels do not carry.
plot=()
timeout 5 python -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/overhead.png")
step overhead 90 python -m offload_ema bench --preset 1b --dtype bf16 --rounds 2 --steps 4 \
  --warmup 1 --modes none,gpu_foreach,offload,offload_fold,offload_multi,diffusers,diffusers_offload \
  --json "$OUT/overhead.json" ${plot[@]+"${plot[@]}"}
cat "$OUT/overhead.txt"

# 10,023 small tensors: the training thread's time in the Averager (avg us/step) and the step
# overhead with small tensors packed on the GPU (default) and copied one by one (pack off).
step many 20 bash -c "python -m offload_ema bench --preset many --rounds 1 --steps 8 \
  --warmup 2 --modes none,offload --json $OUT/many.json && OFFLOAD_EMA_PACK_BYTES=0 \
  python -m offload_ema bench --preset many --rounds 1 --steps 8 --warmup 2 \
  --modes none,offload --json $OUT/many_unpacked.json"
cat "$OUT/many.txt"
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
