# Source on the GPU machine (scripts/bench_*.py runs): installs the carried wheels, sets the paths.
#   .whl/   gsplat, diffusers, plyfile (cp312 / pure-Python wheels)
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
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | grep -v WARNING || true
if compgen -G ".fa4b/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .fa4b/*.whl 2>&1 | grep -v WARNING || true
fi
if [ -d /tmp/cu13 ]; then cp -a --update=none /tmp/cu13/. "$SITE"/; fi
# the CuTe DSL's packages are found through a .pth file, which PYTHONPATH folders do not read
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/python_packages:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
