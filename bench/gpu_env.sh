# Sourced by the device scripts (bench/gpu_run.sh, bench/gpu_rerun.sh): installs the carried wheels
# and sets the environment. Expects the repository root as the working directory.
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
# what every part needs; then optuna's (only `nccompile study`), whose failure must not cost the other parts
pipi .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_*.whl .whl/lark*.whl .whl/safetensors*.whl || exit 3
pipi $(ls .whl/*.whl | grep -v -e /pydantic -e /annotated_types -e /typing_ -e /lark -e /safetensors) \
  || echo "gpu_env: optuna's wheels did not install; the study part will fail"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCOMPILE_TEST_DATA=$PWD/.gpudata/cifar10-mini \
  NCCOMPILE_CACHE_DIR=/tmp/nccache
data=.gpudata/cifar10-mini
stamp() { echo "== $(date +%T) $*"; }
