# Sourced by the device scripts (bench/gpu_run.sh, bench/gpu_rerun.sh): installs the carried wheels
# and sets the environment. Expects the repository root as the working directory.
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCOMPILE_TEST_DATA=$PWD/.gpudata/cifar10-mini \
  NCCOMPILE_CACHE_DIR=/tmp/nccache
data=.gpudata/cifar10-mini
stamp() { echo "== $(date +%T) $*"; }
