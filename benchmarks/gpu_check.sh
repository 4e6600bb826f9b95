#!/usr/bin/env bash
# GPU check in one call: build, every CUDA test (with JWTH_REQUIRE_GPU=1) and the GPU benchmarks,
# all results in one folder, within a time budget (default 480 s).
#
#   benchmarks/gpu_check.sh download [--max-mb 58]   # HERE (with network): wheels -> .whl/, data -> .gpu_data/
#   benchmarks/gpu_check.sh [--out DIR] [--budget S] # on the GPU machine (no network): the check
#   benchmarks/gpu_check.sh --dry-run [--out DIR]    # on a CPU machine: every step in its cheap form
#
# The GPU machine is bare: CUDA's compiler, PyTorch, timm, pybind11 and CMake, no network. Wheels it
# lacks are listed in benchmarks/gpu_wheels.txt; `download` fetches them for Python 3.12 and copies
# the test slides the steps read into .gpu_data/ (carry .whl and .gpu_data with the tree).
#
# Steps (each under `timeout`, each logged to DIR/<step>.log, the budget shared: a step that would
# start with too little time left is recorded as skipped, never silently dropped):
#   env        nvidia-smi, python, torch                             (runs in a dry run too)
#   wheels     pip install --no-index --target the carried wheels    (dry run: lists them)
#   build      setup.py build_ext --inplace, CUDA for sm_90          (dry run: checks cmake/pybind11)
#   doctor     jwth-engine doctor --json                             (runs in a dry run too)
#   tests      the CUDA tests with JWTH_REQUIRE_GPU=1, junit XML     (dry run: --collect-only)
#   heads      bench_heads.py --device cuda (L2-flushing buffer rotation, CUDA events)
#   preprocess bench_preprocess.py --device cuda
#   pipeline   bench_pipeline.py --device cuda --model jwth_vitl14_reg4 on CMU-1 and a synthetic slide
#   backbones  bench_backbones.py --device cuda (eager/compiled, bf16/fp16)
#   decode     bench_cucim_decode.py: cuCIM GPU decode vs CPU decode
#   rawdecode  bench_decode.py --gpu: stored tiles decoded by nvImageCodec on the GPU vs its CPU backend and cuCIM
# Benchmark steps in a dry run get --dry-run: each script parses exactly the arguments the real
# run passes and exits, so a renamed flag fails here, on a CPU, before a GPU is ever spent on it.
# DIR/gpu_check.json: every step's status, seconds and command, with the provenance of the run.
# Exit status: 0 when every step succeeded (dry run: ran or was checked), 1 otherwise.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
MODE=run
OUT="$REPO/gpu_check_out"
BUDGET="${JWTH_GPU_CHECK_BUDGET_S:-}"
MAX_MB=58

if [[ "${1:-}" == "download" ]]; then
  MODE=download
  shift
fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) MODE=dry-run ;;
    --out) OUT="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --max-mb) MAX_MB="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# --- download: wheels for Python 3.12 and the test data, to carry -------------------------------
if [[ "$MODE" == download ]]; then
  DEST="$REPO/.whl"
  mkdir -p "$DEST"
  total=0
  left_out=()
  while read -r spec _; do
    [[ -z "$spec" || "$spec" == \#* ]] && continue
    tmp="$(mktemp -d)"
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "$spec"; then
      echo "download: pip could not fetch $spec" >&2; rm -rf "$tmp"; exit 1
    fi
    size=$(du -bc "$tmp"/*.whl | tail -1 | cut -f1)
    if (( (total + size) / 1048576 > MAX_MB )); then
      left_out+=("$spec ($((size / 1048576)) MiB)")
      rm -rf "$tmp"
      continue
    fi
    total=$((total + size))
    mv "$tmp"/*.whl "$DEST"/
    rm -rf "$tmp"
  done < "$HERE/gpu_wheels.txt"
  DATA="${JWTH_TEST_DATA:-$REPO/../shared/data}"
  mkdir -p "$REPO/.gpu_data/wsi/aperio_svs" "$REPO/.gpu_data/tiles"
  for f in CMU-1-Small-Region.svs tcga-cr-7395-01a-01-ts1.svs openslide-python-small.svs; do
    cp "$DATA/wsi/aperio_svs/$f" "$REPO/.gpu_data/wsi/aperio_svs/"
  done
  cp -r "$DATA/tiles/crc_val_he_7k" "$REPO/.gpu_data/tiles/"
  echo "wheels in $DEST: $((total / 1048576)) MiB; data in $REPO/.gpu_data: $(du -sm "$REPO/.gpu_data" | cut -f1) MiB"
  for s in "${left_out[@]}"; do echo "left out (over --max-mb $MAX_MB): $s"; done
  echo "carry: [\".whl\", \".gpu_data\"]; run: bash benchmarks/gpu_check.sh --out \$OUT"
  exit 0
fi

# --- the check ----------------------------------------------------------------------------------
# 8 minutes on the GPU machine; a dry run on a loaded CPU may take longer (it is not timed).
[[ -z "$BUDGET" ]] && { [[ "$MODE" == dry-run ]] && BUDGET=1500 || BUDGET=480; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
START=$SECONDS
# The source tree is imported when it holds (or, in a real run, will hold) the in-place build; a
# dry run next to an installed package without an in-place build (CI) uses the installed package.
if [[ "$MODE" != dry-run ]] || compgen -G "$REPO/python/jwth_engine/_C*.so" > /dev/null; then
  export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if [[ -z "${JWTH_TEST_DATA:-}" ]]; then
  if [[ -d "$REPO/.gpu_data/wsi" ]]; then JWTH_TEST_DATA="$REPO/.gpu_data"; else JWTH_TEST_DATA="$REPO/../shared/data"; fi
fi
export JWTH_TEST_DATA
CMU="$JWTH_TEST_DATA/wsi/aperio_svs/CMU-1-Small-Region.svs"
cd "$REPO" || exit 1

# step NAME KIND LIMIT_S CMD...   KIND: gpu (dry run: checked form) | any (runs in a dry run too)
step() {
  local name="$1" kind="$2" limit="$3"
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local status rc=0 t0=$SECONDS
  if (( left < 15 )); then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped: time budget spent" 0 - "$*" >> "$STEPS"
    echo "[$name] skipped: budget spent"
    return
  fi
  # A dry run on a small shared CPU spends most of a step importing torch: time is not its point.
  [[ "$MODE" == dry-run ]] && (( limit < 150 )) && limit=150
  (( limit > left - 5 )) && limit=$((left - 5))
  echo "[$name] $* (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    if [[ "$MODE" == dry-run && "$kind" == gpu ]]; then status="skipped (dry run; checked)"; else status=ok; fi
  elif (( rc == 124 || rc == 137 )); then status="timeout after ${limit}s"
  else status="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$rc" "$*" >> "$STEPS"
  echo "[$name] $status in $((SECONDS - t0)) s"
  (( rc != 0 )) && tail -5 "$OUT/$name.log" | sed "s/^/[$name]   /"
}

DRY=()
[[ "$MODE" == dry-run ]] && DRY=(--dry-run)

step env any 30 bash -c "nvidia-smi || echo 'nvidia-smi: not available'; '$PY' -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())'"

SITE="$OUT/site"
if [[ "$MODE" == dry-run ]]; then
  step wheels any 10 bash -c "grep -v '^#' '$HERE/gpu_wheels.txt' | awk 'NF {print \$1}'; ls '$REPO/.whl' 2>/dev/null || echo 'no .whl folder here (fine in a dry run)'"
elif compgen -G "$REPO/.whl/*.whl" > /dev/null; then
  step wheels any 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$REPO"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
else
  printf '%s\t%s\t%s\t%s\t%s\n' wheels "skipped: no .whl folder (run 'gpu_check.sh download' where pip works)" 0 - - >> "$STEPS"
fi

if [[ "$MODE" == dry-run ]]; then
  # pybind11 may live only in pip's isolated build environment here; the GPU image has it installed.
  step build gpu 60 bash -c "cmake --version | head -1 && ('$PY' -c 'import pybind11; print(\"pybind11\", pybind11.__version__)' || echo 'pybind11 not importable here (the GPU image has it)') && test -f setup.py && echo 'would run: JWTH_CUDA_ARCHS=90 $PY setup.py build_ext --inplace'"
else
  step build gpu 240 env JWTH_CUDA_ARCHS="${JWTH_CUDA_ARCHS:-90}" "$PY" setup.py build_ext --inplace
fi

step doctor any 90 bash -c "'$PY' -m jwth_engine.cli doctor --json > '$OUT/doctor.json'"

TESTS=(tests/test_attn_pool_kernels.py tests/test_preprocess.py tests/test_pipeline.py tests/test_backends.py
       tests/test_tensorrt.py tests/test_build.py tests/test_raw_decode.py tests/test_nvimgcodec_engines.py)
SELECT="cuda or gpu or trt or tensorrt or nvcc or compiled"
if [[ "$MODE" == dry-run ]]; then
  step tests gpu 180 "$PY" -m pytest -q -p no:cacheprovider --collect-only -k "$SELECT" "${TESTS[@]}"
else
  # junit_logging: what the tests print (e.g. which colour spec the GPU decoder needed) is kept.
  step tests gpu 150 env JWTH_REQUIRE_GPU=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    -o junit_logging=system-out --junitxml="$OUT/tests_gpu.xml" -k "$SELECT" "${TESTS[@]}"
fi

step heads gpu 75 "$PY" benchmarks/bench_heads.py --device cuda --dims 1024 1536 --batches 64 1 --passes 5 \
  --out "$OUT/heads_cuda.json" "${DRY[@]}"
step preprocess gpu 30 "$PY" benchmarks/bench_preprocess.py --device cuda --out "$OUT/preprocess_cuda.json" "${DRY[@]}"

CASES=(cmu synthetic)
"$PY" -c "import imagecodecs" 2>/dev/null || CASES=(cmu tcga)   # the synthetic slide needs tifffile's JPEG codec
step pipeline gpu 100 "$PY" benchmarks/bench_pipeline.py --device cuda --model jwth_vitl14_reg4 --cases "${CASES[@]}" \
  --repeats 3 --out "$OUT/pipeline_cuda.json" "${DRY[@]}"
step backbones gpu 90 "$PY" benchmarks/bench_backbones.py --device cuda --preset jwth_vitl14_reg4 --batch 64 \
  --repeats 5 --parity --slide "" --out "$OUT/backbones_cuda.json" "${DRY[@]}"
step decode gpu 30 "$PY" benchmarks/bench_cucim_decode.py "$CMU" --out "$OUT/cucim_decode_cuda.json" "${DRY[@]}"
# The raw-tile path: nvImageCodec on the GPU (nvJPEG / nvJPEG2000) beside its CPU backend and cuCIM.
SYNTH=()
"$PY" -c "import imagecodecs" 2>/dev/null || SYNTH=(--no-synthetic)
step rawdecode gpu 120 "$PY" benchmarks/bench_decode.py --gpu --repeats 3 --workers 4 --no-region-blocks --no-engine-ab "${SYNTH[@]}" \
  --out "$OUT/decode_cuda.json" "${DRY[@]}"

"$PY" - "$OUT" "$MODE" "$BUDGET" "$((SECONDS - START))" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, str(Path("benchmarks").resolve()))
from _provenance import finish, provenance, write_result

out, mode, budget, elapsed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, rc, command = line.split("\t", 4)
    steps.append({"step": name, "status": status, "seconds": int(seconds), "exit": rc, "command": command,
                  "log": f"{name}.log"})
good = all(s["status"] == "ok" or s["status"].startswith("skipped (dry run") or s["step"] == "wheels"
           and s["status"].startswith("skipped: no .whl") for s in steps)
report = {"check": "gpu_check", "mode": mode, "budget_s": budget, "elapsed_s": elapsed, "passed": good,
          "provenance": finish(provenance(["benchmarks/gpu_check.sh"] + (["--dry-run"] if mode == "dry-run" else []))),
          "steps": steps, "results": sorted(p.name for p in out.glob("*.json") if p.name != "gpu_check.json")}
write_result(out / "gpu_check.json", report)
for s in steps:
    print(f"{s['step']:<11} {s['status']:<40} {s['seconds']:>4} s")
print(f"{'passed' if good else 'FAILED'} in {elapsed} s (budget {budget} s); {out / 'gpu_check.json'}")
sys.exit(0 if good else 1)
EOF
