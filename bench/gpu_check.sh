#!/usr/bin/env bash
# The GPU check, run through the device tool on one H200 (< 5 minutes):
#   builds the extension against the torch there, runs the CUDA tests (and the kernel and
#   Averager tests, so the AVX-512 path is covered too), then a short run of the overhead
#   benchmark on the 1b preset (bf16). Results go under $OUT (env.txt, build.log, tests.txt,
#   junit.xml, overhead.txt/json/png).
# The machine has no network: pytest, ninja, psutil and safetensors come from wheels in .wheels/
# (make gpu-wheels),
# carried along with `carry: [".wheels"]`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
{ nvidia-smi; python -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"; lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-300; } > "$OUT/env.txt" 2>&1
if [ -d .wheels ]; then
  python -m pip install -q --no-index --find-links .wheels pytest ninja psutil safetensors >>"$OUT/build.log" 2>&1 || true
fi
export MAX_JOBS=16
t0=$(date +%s)
if ! python -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1; then
  python setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
fi
echo "build: $(( $(date +%s) - t0 )) s"
python -c "from offload_ema import ops; print('kernels:', ops.backend(), ops.isa(), 'threads', ops.get_num_threads())"
timeout 200 python -m pytest -q -x tests/test_cuda.py tests/test_ops.py tests/test_averager.py \
  --junitxml="$OUT/junit.xml" > "$OUT/tests.txt" 2>&1
echo "tests rc=$?"; tail -5 "$OUT/tests.txt"
# swa_utils is left out here: like naive it costs many seconds per 1b step; the full run has it.
timeout 200 python -m offload_ema bench --preset 1b --dtype bf16 --rounds 2 --steps 4 --warmup 1 \
  --modes none,gpu_foreach,offload,offload_multi,naive \
  --json "$OUT/overhead.json" --plot "$OUT/overhead.png" 2>&1 | tee "$OUT/overhead.txt"
# Snapshot writing during training (1b, float32 files of ~4.2 GB) and the disk's own speed.
timeout 150 python -m offload_ema bench --preset 1b --dtype bf16 --rounds 1 --steps 6 --warmup 1 \
  --modes none,offload --save-every 3 --json "$OUT/save.json" 2>&1 | tee "$OUT/save.txt"
