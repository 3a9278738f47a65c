#!/usr/bin/env bash
# The GPU check, run through the device tool on one lent H100 / H200 (torch 2.11, Python 3.12,
# no network). The whole script stays under 5 minutes: every step has its own limit, and the
# limits plus each step's 2 s kill grace add up to BUDGET (checked below, and by the test).
#   env      the machine: GPU, torch, CPU
#   wheels   the packages its image lacks (diffusers, for the peer modes), from .wheels/
#            (make gpu-wheels here; carry: [".wheels"])
#   build    the extension against the torch there, in place
#   tests    the CUDA tests (tests/test_cuda.py)
#   overhead the overhead benchmark on the 1b preset (bf16), 2 short rounds, diffusers' EMAModel
#            (on the GPU, and its scripts' offload pattern) beside ours, fold 1 and 4
#   many     the many-tensor preset, small tensors packed and not
# $OUT gets at most 4 files, rewritten after every step (a run cut short still reports what it
# got): summary.txt (each step's "name rc seconds" and the lines that matter), results.json
# (the benchmark records, the test counts), overhead.png (where matplotlib is), logs.tar.gz
# (every step's full output).
# GPU_CHECK_DRY=1: on a CPU-only machine every step runs a reduced form of its command (tiny
# models on the CPU, the CUDA tests collected and skipped), so that the script cannot rot
# between lendings (tests/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
DRY=${GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1  # output reaches the logs as it is printed
export MAX_JOBS=16
start=$(date +%s)

# Seconds per step; with 2 s of kill grace each they must stay within BUDGET (of the 300 s plan,
# the rest is the publishing between steps).
declare -A LIMIT=([env]=8 [wheels]=15 [build]=80 [tests]=60 [overhead]=75 [many]=40)
BUDGET=290
sum=0
for k in "${!LIMIT[@]}"; do sum=$(( sum + LIMIT[$k] + 2 )); done
echo "budget: step limits and kill grace $sum s of $BUDGET s (dry=$DRY)" > "$WORK/steps.txt"
if [ "$sum" -gt "$BUDGET" ]; then
  echo "gpu_check: the step limits ($sum s) exceed the budget ($BUDGET s)" >&2
  exit 2
fi

publish() {  # the 4 result files, from what the steps have written so far
  {
    cat "$WORK/steps.txt"
    for f in tests overhead many; do
      [ -f "$WORK/$f.txt" ] || continue
      echo; echo "== $f (last lines)"
      grep -E "^(verdict|  offload vs|offload vs|host update|offload(_fold|_multi)?:|=+ .* =+$)" \
        "$WORK/$f.txt" | tail -25
    done
  } > "$OUT/summary.txt"
  python - "$WORK" "$OUT/results.json" <<'PY' 2>/dev/null
import json, os, sys, xml.etree.ElementTree as ET
work, out = sys.argv[1], sys.argv[2]
res = {}
for name in ("overhead", "many", "many_unpacked"):
    p = os.path.join(work, name + ".json")
    if os.path.exists(p):
        with open(p) as f:
            res[name] = json.load(f)
p = os.path.join(work, "junit.xml")
if os.path.exists(p):
    s = ET.parse(p).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    res["cuda_tests"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
with open(out, "w") as f:
    json.dump(res, f, indent=1)
PY
  [ -f "$WORK/overhead.png" ] && cp "$WORK/overhead.png" "$OUT/overhead.png"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null
}
trap publish EXIT

# step NAME CMD...: runs CMD with its output in $WORK/NAME.txt, at most LIMIT[NAME] seconds
# (+2 s for a process that ignores SIGTERM), then publishes.
step() {
  local name=$1 limit=${LIMIT[$1]} t0 rc
  shift
  t0=$(date +%s)
  timeout -k 2 "$limit" "$@" >"$WORK/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s, total $(( $(date +%s) - start ))s)" \
    | tee -a "$WORK/steps.txt"
  publish
  return $rc
}

step env bash -c "command -v nvidia-smi >/dev/null && nvidia-smi || echo 'skipped: no CUDA'; \
python -c \"import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available())\"; \
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-300"

if [ -d .wheels ]; then
  # Only what the image lacks (its own pytest, numpy, huggingface-hub ... stay as they are).
  step wheels bash -c "python -m pip install -q --no-index --no-deps .wheels/*.whl \
    $( [ "$DRY" = 1 ] && echo --dry-run ) && python -c 'import diffusers' \
    $( [ "$DRY" = 1 ] && echo '|| true' )"
else
  echo "wheels skipped: no .wheels (make gpu-wheels); the diffusers modes will say unavailable" \
    | tee -a "$WORK/steps.txt"
fi

if [ "$DRY" = 1 ]; then  # the extension make setup built here
  step build python -c "from offload_ema import ops; assert ops.backend() == 'cpp'; \
print('dry: extension already built:', ops.backend(), ops.isa())"
else
  # One build, in place: the tests and the benchmark run from the repository root.
  step build python setup.py build_ext --inplace || { tail -40 "$WORK/build.txt"; exit 1; }
fi
timeout 8 python -c "from offload_ema import ops; print('kernels:', ops.backend(), ops.isa(), \
'threads', ops.get_num_threads())" 2>&1 | tee -a "$WORK/steps.txt"

step tests python -m pytest -v -x -m cuda tests/test_cuda.py --junitxml="$WORK/junit.xml" \
  -p no:cacheprovider
tail -5 "$WORK/tests.txt"

plot=()
timeout 5 python -c "import matplotlib" 2>/dev/null && plot=(--plot "$WORK/overhead.png")
if [ "$DRY" = 1 ]; then
  size=(--preset tiny --device cpu --layers 1 --width 64 --rounds 1 --steps 2 --warmup 0)
  many=(--preset tiny --device cpu --layers 1 --width 64 --experts 40 --rounds 1 --steps 2 \
        --warmup 0)
else
  size=(--preset 1b --dtype bf16 --rounds 2 --steps 4 --warmup 1)
  many=(--preset many --rounds 1 --steps 8 --warmup 2)
fi
# naive and swa_utils are left out: each costs seconds per 1b step (the synchronous baseline is
# known: ~25x); offload_fold (4 snapshots per pass) gives the host update per snapshot of fold 1
# vs 4 in the same run.
step overhead python -m offload_ema bench "${size[@]}" \
  --modes none,gpu_foreach,offload,offload_fold,offload_multi,diffusers,diffusers_offload \
  --json "$WORK/overhead.json" ${plot[@]+"${plot[@]}"}
cat "$WORK/overhead.txt"

# 10,023 small tensors: the training thread's time in the Averager and the step overhead with
# small tensors packed on the GPU (default) and copied one by one (pack off).
step many bash -c "python -m offload_ema bench ${many[*]} --modes none,offload \
  --json $WORK/many.json && OFFLOAD_EMA_PACK_BYTES=0 python -m offload_ema bench ${many[*]} \
  --modes none,offload --json $WORK/many_unpacked.json"
tail -20 "$WORK/many.txt"
echo "total $(( $(date +%s) - start ))s" | tee -a "$WORK/steps.txt"
