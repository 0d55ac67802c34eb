# Source on the GPU machine (scripts/bench_*.py runs): installs the carried wheels, sets the paths.
#   .whl/   gsplat, diffusers, plyfile (cp312 / pure-Python wheels)
#   .fa4b/  FlashAttention-4 and its CuTe DSL stack, except the CUDA 13 DSL libraries, which are
#           too big to travel with the rest: a first call unpacks .fa4a/cu13.tar.xz into /tmp/cu13
#           (the machine keeps it while warm), this merges it.
set -e
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | grep -v WARNING || true
if compgen -G ".fa4b/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .fa4b/*.whl 2>&1 | grep -v WARNING || true
fi
if [ -d /tmp/cu13 ]; then cp -a --update=none /tmp/cu13/. "$SITE"/; fi
# the CuTe DSL's packages are found through a .pth file, which PYTHONPATH folders do not read
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/python_packages:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
set +e
