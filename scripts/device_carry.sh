#!/usr/bin/env bash
# Fill the ignored folders that the GPU runs carry to the device machine (scripts/gpu_runs.sh,
# scripts/device_env.sh say what reads them). Run on the dev machine from the repository root, after
# `make setup`; a new checkout has none of them. Each carry is at most 64 MiB: carry what a stage reads.
#   .whl/            gsplat, diffusers, peft, plyfile, pyzmq, msgpack, ... as cp312 wheels (about 15 MB)
#   .whlq/           .whl without diffusers and peft (about 8.6 MB): .whlq + .pcmx + the door's images fit
#                    one 64-MiB carry with the tracked files, which count too (4.1 MB; door_patchmatch.txt)
#   .pcmx/           pycolmap-cuda12 + libcudart (pcm_cuda.tar.xz, about 44 MB) and the X11 client
#                    libraries it links (xlibs.tar.xz, from this Debian 12 machine); `gpu_runs.sh unpack_pycolmap`
#   .device_data/    the shared scenes (never committed): the fern's images_8, the door, its COLMAP model
#                    imported into a scene.json (the GPU machine reads it without pycolmap), temple, dino
# FlashAttention-4 (.fa4a/.fa4b) and Ray (.rayx) are filled as scripts/device_env.sh says.
# Usage: bash scripts/device_carry.sh [whl] [whlq] [pcmx] [data]    (all four when none is named)
set -euo pipefail
DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
what=("$@")
[ ${#what[@]} -eq 0 ] && what=(whl whlq pcmx data)
QUALITY_WHEELS=(gsplat plyfile jaxtyping wadler-lindig ninja msgpack pyzmq platformdirs tqdm)  # what the quality runs import
download() {  # download DEST PACKAGE...: cp312 manylinux wheels, no dependencies resolved here
  local dest=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$dest" "$@" 2>&1 | grep -v "is ignored" || true
}
for w in "${what[@]}"; do
  case "$w" in
    whl)
      download .whl "${QUALITY_WHEELS[@]}" diffusers peft
      ;;
    whlq)
      download .whlq "${QUALITY_WHEELS[@]}"
      ;;
    pcmx)
      tmp=$(mktemp -d)
      download "$tmp" pycolmap-cuda12 nvidia-cuda-runtime-cu12
      mkdir -p "$tmp/site" "$tmp/xlibs" .pcmx
      for f in "$tmp"/*.whl; do python3 -m zipfile -e "$f" "$tmp/site/"; done
      # pycolmap loads libcudart.so.12 alone: the runtime wheel's headers and static libraries stay behind
      rm -rf "$tmp/site/nvidia/cuda_runtime/include" "$tmp"/site/nvidia/cuda_runtime/lib/*.a
      tar cf - -C "$tmp/site" . | xz -T2 -9e > .pcmx/pcm_cuda.tar.xz  # -9e: 1.3 MB under -6, 3 minutes
      for lib in libSM.so.6 libICE.so.6 libX11.so.6 libXext.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6 \
        libuuid.so.1 libbsd.so.0 libmd.so.0; do
        cp -L "/usr/lib/x86_64-linux-gnu/$lib" "$tmp/xlibs/"
      done
      tar cf - -C "$tmp/xlibs" . | xz -6 > .pcmx/xlibs.tar.xz
      rm -rf "$tmp"
      ;;
    data)
      mkdir -p .device_data/llff_fern
      cp -r "$DATA/llff_fern/images_8" "$DATA/llff_fern/poses_bounds.npy" .device_data/llff_fern/
      cp -r "$DATA/lund_door" "$DATA/middlebury_dino" "$DATA/middlebury_temple" .device_data/
      "$PY" -m backend.cli import colmap .device_data/lund_door .device_data/lund_door_imported
      ;;
    *)
      echo "unknown folder $w (whl, whlq, pcmx, data)" >&2
      exit 2
      ;;
  esac
done
du -sh .whl .whlq .pcmx .device_data 2>/dev/null || true
