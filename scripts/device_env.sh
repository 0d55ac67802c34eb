# Source on the GPU machine (scripts/bench_*.py runs): installs the carried wheels, sets the paths.
#   .whl/   gsplat, diffusers, plyfile (cp312 / pure-Python wheels); .whlq/ the same without diffusers and
#           peft (the quality runs import neither), for a carry with .pcmx and the door
#   .fa4b/  FlashAttention-4 and its CuTe DSL stack, except the CUDA 13 DSL libraries, which are
#           too big to travel with the rest: a first call unpacks .fa4a/cu13.tar.xz into /tmp/cu13
#           (the machine keeps it while warm), this merges it.
# Filling them on the dev machine (cp312 wheels, no dependencies resolved there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .fa4b \
#     flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
#     nvidia-cutlass-dsl-libs-core==4.8.1 cuda-bindings cuda-pathfinder apache-tvm-ffi torch-c-dlpack-ext \
#     quack-kernels einops protobuf
#   (same flags) -d /tmp/w nvidia-cutlass-dsl-libs-cu13==4.8.1; unzip it into a folder and
#   tar cf - -C folder . | xz -9e > .fa4a/cu13.tar.xz   (63 MB)
# First device call: mkdir -p /tmp/cu13 && tar xJf .fa4a/cu13.tar.xz -C /tmp/cu13   (carry .fa4a)
# Next call, within the machine's idle time: source scripts/device_env.sh; python scripts/...  (carry .whl .fa4b)
# Ray (issue 17's overhead run) and pycolmap with CUDA (PatchMatch) travel the same way, unpacked by
# `bash scripts/gpu_runs.sh unpack_ray` / `unpack_pycolmap` into /tmp/raysite and /tmp/pcmsite:
#   .rayx/ray.tar.xz      the ray 2.60 cp312 wheel unzipped without its Java jars and libraries we do not
#                         import (rllib, tune, train, serve, data, llm), plus its dependencies' wheels
#   .pcmx/pcm_cuda.tar.xz pycolmap-cuda12 and nvidia-cuda-runtime-cu12 unzipped (libcudart.so.12;
#                         libcurand.so.10 comes from torch's CUDA libraries)
#   .pcmx/xlibs.tar.xz    the X11 client libraries pycolmap links (libSM, libICE, libX11, libXext, ...),
#                         taken from a Debian 12 machine, searched after the system's
SITE=/tmp/site
for wheels in .whl .whlq; do  # .whlq: .whl without diffusers and peft, where a carry has no room for them
  if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheels"/*.whl 2>&1 | grep -v WARNING || true
  fi
done
if compgen -G ".fa4b/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .fa4b/*.whl 2>&1 | grep -v WARNING || true
fi
if [ -d /tmp/cu13 ]; then cp -a --update=none /tmp/cu13/. "$SITE"/; fi
# the CuTe DSL's packages are found through a .pth file, which PYTHONPATH folders do not read
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/python_packages:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD"
if [ -d /tmp/raysite ]; then PYTHONPATH="/tmp/raysite:$PYTHONPATH"; fi
if [ -d /tmp/pcmsite ]; then
  SP=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  CURAND=$(find "$SP" -name 'libcurand.so.10*' 2>/dev/null | head -1)
  export LD_LIBRARY_PATH="/tmp/pcmsite/nvidia/cuda_runtime/lib${CURAND:+:$(dirname "$CURAND")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/tmp/xlibs"
  PYTHONPATH="/tmp/pcmsite:$PYTHONPATH"
fi
export PYTHONPATH
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
# gsplat's CUDA kernels built by an earlier machine of this session (`gpu_runs.sh` saves them to $OUT as
# gsplat_cuda.so.xz; `mkdir -p .gsplat_so && cp /work/.device/N/gsplat_cuda.* .gsplat_so/` here): a module
# gsplat.csrc, which gsplat imports before it compiles, loads them, saving the 60-70 s build of every
# fresh machine. Used only where they were built for this torch, gsplat and CUDA architecture.
if [ -f .gsplat_so/gsplat_cuda.so.xz ] && [ -f .gsplat_so/gsplat_cuda.stamp ] && [ ! -f "$SITE/gsplat/csrc.py" ]; then
  if [ "$(cat .gsplat_so/gsplat_cuda.stamp)" == "$(python3 scripts/gsplat_prebuilt.py stamp)" ]; then
    mkdir -p /tmp/gsplat_prebuilt && xz -dc .gsplat_so/gsplat_cuda.so.xz > /tmp/gsplat_prebuilt/gsplat_cuda.so \
      && python3 scripts/gsplat_prebuilt.py shim /tmp/gsplat_prebuilt/gsplat_cuda.so > "$SITE/gsplat/csrc.py"
  else
    echo "device_env: .gsplat_so was built for $(cat .gsplat_so/gsplat_cuda.stamp), not this machine: gsplat compiles" >&2
  fi
fi
