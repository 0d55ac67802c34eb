#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, one stage per call of the device tool (each call <= 10 min).
# Run from the repository root on the GPU machine with the carried folders in place (scripts/device_env.sh):
#   .whl (gsplat, diffusers, peft, plyfile, ...), .device_data (the shared scenes, never committed),
#   .fa4a/.fa4b for FlashAttention-4 (generator stages only).
# Usage: bash scripts/gpu_runs.sh STAGE [ARGS...]; results and logs go to $OUT.
# Carry what a stage reads in its own call: a warm machine keeps /tmp (unpacked archives, gsplat's
# build), but a .device_data scene carried by an earlier call was gone when the next call carried others.
# A fresh machine compiles gsplat's kernels (60-70 s) unless .gsplat_so is carried: the stages that import
# gsplat leave gsplat_cuda.so.xz and gsplat_cuda.stamp in $OUT after a build; on the dev machine
#   mkdir -p .gsplat_so && cp /work/.device/N/gsplat_cuda.* .gsplat_so/   (then carry .gsplat_so too)
#   probe                      what the machine has (torch, CUDA, cv2, pycolmap, gsplat), gsplat's kernel build
#   loop [ARGS]                scripts/bench_loop.py: the whole job on the temple, 120 frames at 896x512
#                              (--fit-set / --guide-set FIELD=VALUE time a candidate FitConfig / GuideConfig
#                              default; --generator refine)
#   quality SCENES VARIANTS SEEDS [ITER]   scripts/bench_loop_quality.py (comma-separated lists)
#   quality_parallel SCENES VARIANTS SEEDS [ITER]   one process per scene and seed at once, merged
#                              (quality figures only: concurrent processes' timings, and the refiner's
#                              training steps in its time budget, are not a lone job's: fix them with
#                              QUALITY_ARGS="--refine-steps 700 --refine-seconds 600", about 10 s alone)
#   jobs SPEC [ITER]           one bench_loop_quality process per line of SPEC, all at once, merged:
#                              lines `SCENE|VARIANTS|SEED[|EXTRA ARGS]` (a sweep: seeds and variant groups
#                              split between processes; each scores its own default row, the merge averages a seed's);
#                              JOBS_MATCH=PATTERN runs only the lines grep matches; JOBS_DRY=1 lists them and stops
#   ceiling SCENES SEEDS [MIXES [ARGS]] scripts/frames_ceiling.py at each scene's bench size, 3000 steps, one process
#                              per scene and seed at once (the loop fed a dense fit's renders against reproject's
#                              frames, and MIXES of the two: shares of the dense render, e.g. 0.25,0.5,0.75; ARGS
#                              passed on, e.g. --capture-share 0.3, --choices 9 --no-dense)
#   fit_steps [ARGS]           scripts/bench_fit_steps.py: the job's guide as 1 set and as 3 in lockstep, host waits per step
#   ssim [ARGS]                scripts/bench_ssim.py: the fit's SSIM, the Triton kernels against depthwise convolutions
#   knn [ARGS]                 scripts/bench_knn.py: the fit's initial k-NN, k-d tree against the exhaustive search
#   leave_out [ARGS]           scripts/bench_leave_out_fits.py: the refiner's leave-out guides one after another
#                              against all at once in lockstep (temple, fern, door at their bench sizes)
#   union SCENES SEEDS [ARGS]  scripts/guide_union.py: the guide's mean of renders against the union of its sets
#   rounds SCENES SEEDS [ARGS] scripts/ensemble_rounds.py: rounds of the loop, each guide an ensemble of the last round's fits
#   diversity SCENES SEEDS [ARGS] scripts/guide_diversity.py: the guide's members bagged, a render over moved cameras
#   generator MODES            scripts/bench_generator.py --compile-blocks --modes MODES
#   unpack_fa4                 unpack .fa4a/cu13.tar.xz into /tmp/cu13 (kept while the machine is warm)
#   unpack_ray                 unpack .rayx/ray.tar.xz into /tmp/raysite (scripts/device_env.sh says what it is)
#   unpack_pycolmap            unpack .pcmx/*.tar.xz into /tmp/pcmsite and /tmp/xlibs
#   overhead [REPEATS] [PATHS] issue 17: the bench_loop job by run_loop, the service's worker thread, a one-GPU Ray pool
#   patchmatch                 PatchMatch against plane sweep on the door (scripts/gpu_check_patchmatch.py)
#   patchmatch_llff [ANGLES]   depth coverage on the fern's 3 views: plane sweep, PatchMatch per minimum angle
set -uo pipefail
jobs_spec() {  # jobs_spec SPEC: the lines of a job spec that JOBS_MATCH selects, or an error
  [ -f "${1:-}" ] || { echo "jobs: the spec file '${1:-}' does not exist (usage: jobs SPEC [ITER])" >&2; return 1; }
  grep -v '^\s*\(#\|$\)' "$1" | grep -e "${JOBS_MATCH:-.}" || { echo "jobs: no line of $1 matches" >&2; return 1; }
}
if [ "${1:-}" = jobs ] && [ -n "${JOBS_DRY:-}" ]; then  # JOBS_DRY=1: which processes a call would start and the
  # rows each scores ("default" first, named or not), then stop; no set-up, so it runs on the dev machine too
  spec=$(jobs_spec "${2:-}") || exit 1
  n=$(wc -l <<< "$spec")
  if [ "$n" = 1 ]; then echo "1 process:"; else echo "$n processes at once:"; fi
  while IFS='|' read -r scene variants seed extra; do
    [[ ",$variants," == *",default,"* ]] || variants="default,$variants"
    echo "  $scene seed $seed: ${variants//,/, }${extra:+ ($extra)}"
  done <<< "$spec"
  exit 0
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/device_env.sh
stage=${1:-probe}
shift || true
unpack_wheels() {  # unpack_wheels TARBALL DEST: a tarball of unzipped packages and wheels, wheels installed
  mkdir -p "$2" && tar xJf "$1" -C "$2" && if compgen -G "$2/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$2" "$2"/*.whl 2>&1 | grep -v WARNING
    rm -f "$2"/*.whl
  fi
}
save_gsplat() {  # gsplat's kernels, if this machine compiled them, back in $OUT for the next machine's carry
  local lib
  lib=$(python3 scripts/gsplat_prebuilt.py built)
  if [ -n "$lib" ] && [ ! -f "$SITE/gsplat/csrc.py" ] && [ ! -f "$OUT/gsplat_cuda.so.xz" ]; then
    xz -T0 -6 -c "$lib" > "$OUT/gsplat_cuda.so.xz" && python3 scripts/gsplat_prebuilt.py stamp > "$OUT/gsplat_cuda.stamp"
  fi
}
gsplat_ready() {  # build gsplat's kernels once (or load the carried ones), before processes wait on its build lock
  python3 -c "import torch, gsplat; from gsplat.cuda._backend import _C; print('gsplat', gsplat.__version__, _C is not None)"
  save_gsplat
}
each_scene_seed() {  # each_scene_seed SCENES SEEDS FN [ARGS...]: FN SCENE SEED ARGS... for every pair at once,
  # the machine's cores shared between them (torch's CPU threads would oversubscribe them); waits for all
  local scenes seeds s seed
  IFS=, read -ra scenes <<< "$1"
  IFS=, read -ra seeds <<< "$2"
  local pairs=$(( ${#scenes[@]} * ${#seeds[@]} ))
  export OMP_NUM_THREADS=$(( $(nproc) / pairs > 0 ? $(nproc) / pairs : 1 ))
  for s in "${scenes[@]}"; do
    for seed in "${seeds[@]}"; do
      "$3" "$s" "$seed" "${@:4}" &
    done
  done
  wait
}
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
    gsplat_ready
    ;;
  loop)
    gsplat_ready
    python3 scripts/bench_loop.py --data .device_data/middlebury_temple --out "$OUT" "$@" 2>&1 | tee -a "$OUT/loop.log"
    ;;
  fit_steps)
    gsplat_ready
    python3 scripts/bench_fit_steps.py --data .device_data/middlebury_temple --out "$OUT" "$@" 2>&1 \
      | tee -a "$OUT/fit_steps.log"
    ;;
  ssim)
    python3 scripts/bench_ssim.py --out "$OUT" "$@" 2>&1 | tee "$OUT/ssim.log"
    ;;
  knn)
    python3 scripts/bench_knn.py --data .device_data --device cuda "$@" 2>&1 | tee "$OUT/knn.log"
    ;;
  leave_out)
    gsplat_ready
    python3 scripts/bench_leave_out_fits.py --data .device_data --out "$OUT" "$@" 2>&1 | tee -a "$OUT/leave_out.log"
    ;;
  quality)
    python3 scripts/bench_loop_quality.py --data .device_data --scenes "$1" --variants "$2" --seeds "$3" \
      --iterations "${4:-3000}" --out "$OUT/quality_${1//,/_}.json" 2>&1 | tee "$OUT/quality_${1//,/_}.log"
    ;;
  quality_parallel)
    gsplat_ready
    quality_one() {  # SCENE SEED VARIANTS ITERATIONS
      # shellcheck disable=SC2086
      timeout "${QUALITY_TIMEOUT_S:-540}" python3 scripts/bench_loop_quality.py --data .device_data --scenes "$1" \
        --variants "$3" --seeds "$2" --iterations "$4" --out "$OUT/quality_$1_seed$2.json" ${QUALITY_ARGS:-} \
        > "$OUT/quality_$1_seed$2.log" 2>&1
    }
    each_scene_seed "$1" "$3" quality_one "$2" "${4:-3000}"
    python3 scripts/bench_loop_quality.py --merge "$OUT"/quality_*_seed*.json --out "$OUT/quality_merged.json"
    ;;
  jobs)
    # JOBS_MATCH (a grep pattern) runs only the spec lines it matches: a spec too long for one call, split.
    # It is a basic pattern: '^door|' matches lines starting "door|", while '\|' means "or" and an empty
    # alternative matches every line (run 57 lost a call to that). JOBS_DRY=1: see jobs_spec.
    # JOBS_PICTURES=1 keeps each run's pictures (--pictures), in the archive under pictures/
    spec=$(jobs_spec "${1:-}") || exit 1
    jobs=$(wc -l <<< "$spec")
    gsplat_ready
    # the machine's cores shared between the processes (torch's CPU threads would oversubscribe them)
    export OMP_NUM_THREADS=$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))
    n=0
    while IFS='|' read -r scene variants seed extra; do
      [[ -z "$scene" || "$scene" == \#* ]] && continue
      n=$((n + 1))
      # shellcheck disable=SC2086
      timeout "${QUALITY_TIMEOUT_S:-540}" python3 scripts/bench_loop_quality.py --data .device_data --scenes "$scene" \
        --variants "$variants" --seeds "$seed" --iterations "${2:-3000}" --out "$OUT/job${n}_${scene}_seed$seed.json" \
        ${JOBS_PICTURES:+--pictures "$OUT/pictures"} $extra > "$OUT/job${n}_${scene}_seed$seed.log" 2>&1 &
    done <<< "$spec"
    wait
    python3 scripts/bench_loop_quality.py --merge "$OUT"/job*_seed*.json --out "$OUT/jobs_merged.json"
    # the device tool brings back a few files per call: the processes' files travel as one archive, the
    # pictures as JPEG (a PNG per run would pass its size limit)
    [ -d "$OUT/pictures" ] && python3 -c '
import pathlib, sys
from PIL import Image
for p in pathlib.Path(sys.argv[1]).glob("*.png"):
    Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=88)
    p.unlink()' "$OUT/pictures"
    tar czf "$OUT/jobs.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d job*_seed*.* pictures 2>/dev/null) \
      && rm -rf "$OUT"/job*_seed*.* "$OUT/pictures"
    ;;
  ceiling)
    gsplat_ready
    # scripts/frames_ceiling.py, one process per scene and seed at once (their tables in ceiling_*.log)
    ceiling_one() {  # SCENE SEED MIXES [ARGS...]
      timeout "${QUALITY_TIMEOUT_S:-540}" python3 scripts/frames_ceiling.py --data .device_data --scene "$1" \
        --iterations 3000 --dense-iterations 3000 --seed "$2" --mixes "$3" --device cuda "${@:4}" \
        > "$OUT/ceiling_$1_seed$2.log" 2>&1
    }
    each_scene_seed "$1" "$2" ceiling_one "${3:-}" "${@:4}"
    for f in "$OUT"/ceiling_*.log; do echo "== $f"; awk '/ steps \(dense fit/ {p = 1} p' "$f"; done  # header, table
    ;;
  union|rounds|diversity)
    gsplat_ready
    # an analysis script of scripts/ run per bench scene (add_scene_seed_args), one process per scene and seed
    # at once: guide_union.py (the guide's mean of renders against the union of its sets), ensemble_rounds.py
    # (the loop's rounds, each guide an ensemble of the last round's fits) or guide_diversity.py (members
    # made different by more than their seeds)
    script=$(case $stage in union) echo guide_union ;; rounds) echo ensemble_rounds ;; *) echo guide_diversity ;; esac)
    analysis_one() {  # SCENE SEED [ARGS...]
      timeout "${QUALITY_TIMEOUT_S:-540}" python3 "scripts/$script.py" --data .device_data --scenes "$1" \
        --seeds "$2" --device cuda --out "$OUT/${stage}_$1_seed$2.json" "${@:3}" > "$OUT/${stage}_$1_seed$2.log" 2>&1
    }
    each_scene_seed "$1" "$2" analysis_one "${@:3}"
    grep -h " it seed " "$OUT"/"${stage}"_*.log || tail -20 "$OUT"/"${stage}"_*.log
    ;;
  generator)
    python3 scripts/bench_generator.py --out "$OUT/generator.json" --compile-blocks --modes "$1" 2>&1 \
      | tee "$OUT/generator.log"
    ;;
  unpack_ray)
    unpack_wheels .rayx/ray.tar.xz /tmp/raysite && echo unpacked ray
    ;;
  unpack_pycolmap)
    unpack_wheels .pcmx/pcm_cuda.tar.xz /tmp/pcmsite && mkdir -p /tmp/xlibs && tar xJf .pcmx/xlibs.tar.xz -C /tmp/xlibs \
      && echo unpacked pycolmap
    ;;
  overhead)
    python3 scripts/bench_loop.py --data .device_data/middlebury_temple --out "$OUT" --save-scene /tmp/bench_scene
    python3 scripts/bench_cluster.py overhead --scene /tmp/bench_scene --repeats "${1:-2}" --paths "${2:-direct,thread}" \
      --out "$OUT" 2>&1 \
      | tee "$OUT/overhead.log"
    ;;
  patchmatch)
    python3 scripts/gpu_check_patchmatch.py --scene .device_data/lund_door --sides 640 1024 --views 3 5 \
      --out "$OUT/patchmatch.json" 2>&1 | tee "$OUT/patchmatch.log"
    ;;
  patchmatch_llff)
    python3 scripts/gpu_check_patchmatch.py --llff .device_data/llff_fern --angles ${1:-3 1 0.5} \
      --out "$OUT/patchmatch_llff.json" 2>&1 | tee "$OUT/patchmatch_llff.log"
    ;;
  unpack_fa4)
    mkdir -p /tmp/cu13 && tar xJf .fa4a/cu13.tar.xz -C /tmp/cu13 && echo unpacked
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
