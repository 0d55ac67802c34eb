#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, one stage per call of the device tool (each call <= 10 min).
# Run from the repository root on the GPU machine with the carried folders in place (scripts/device_env.sh):
#   .whl (gsplat, diffusers, peft, plyfile, ...), .device_data (the shared scenes, never committed),
#   .fa4a/.fa4b for FlashAttention-4 (generator stages only).
# Usage: bash scripts/gpu_runs.sh STAGE [ARGS...]; results and logs go to $OUT.
#   probe                      what the machine has (torch, CUDA, cv2, pycolmap, gsplat), gsplat's kernel build
#   loop [ARGS]                scripts/bench_loop.py: the whole job on the temple, 120 frames at 896x512
#   quality SCENES VARIANTS SEEDS [ITER]   scripts/bench_loop_quality.py (comma-separated lists)
#   quality_parallel SCENES VARIANTS SEEDS [ITER]   one process per scene at once (quality figures only:
#                              the timings of concurrent processes are not the job's)
#   generator MODES            scripts/bench_generator.py --compile-blocks --modes MODES
#   unpack_fa4                 unpack .fa4a/cu13.tar.xz into /tmp/cu13 (kept while the machine is warm)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/device_env.sh
stage=${1:-probe}
shift || true
case "$stage" in
  probe)
    python3 - <<'PY' 2>&1 | tee "$OUT/probe.log"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("cv2", "pycolmap", "gsplat", "diffusers", "peft", "plyfile", "ray", "flash_attn"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), "cuda" if getattr(mod, "has_cuda", False) else "")
    except Exception as e:
        print(m, "MISSING", type(e).__name__, str(e)[:120])
PY
    ;;
  loop)
    python3 scripts/bench_loop.py --data .device_data/middlebury_temple --out "$OUT" "$@" 2>&1 | tee -a "$OUT/loop.log"
    ;;
  quality)
    python3 scripts/bench_loop_quality.py --data .device_data --scenes "$1" --variants "$2" --seeds "$3" \
      --iterations "${4:-3000}" --out "$OUT/quality_${1//,/_}.json" 2>&1 | tee "$OUT/quality_${1//,/_}.log"
    ;;
  quality_parallel)
    # build gsplat's kernels once, before the processes would all wait on its build lock
    python3 -c "import torch, gsplat; from gsplat.cuda._backend import _C; print('gsplat', gsplat.__version__, _C is not None)"
    IFS=, read -ra scenes <<< "$1"
    for s in "${scenes[@]}"; do
      python3 scripts/bench_loop_quality.py --data .device_data --scenes "$s" --variants "$2" --seeds "$3" \
        --iterations "${4:-3000}" --out "$OUT/quality_$s.json" > "$OUT/quality_$s.log" 2>&1 &
    done
    wait
    tail -n 30 "$OUT"/quality_*.log
    ;;
  generator)
    python3 scripts/bench_generator.py --out "$OUT/generator.json" --compile-blocks --modes "$1" 2>&1 \
      | tee "$OUT/generator.log"
    ;;
  unpack_fa4)
    mkdir -p /tmp/cu13 && tar xJf .fa4a/cu13.tar.xz -C /tmp/cu13 && echo unpacked
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
