#!/usr/bin/env bash
# Everything issue 8 asks of a GPU, in one device call (prepare with bench/gpu_prepare.sh first):
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".gpudata"], timeout_s=540)
# Writes to $OUT: nvidia-smi.txt, pytest.log (CUDA tests), bench_gpu.log/.json, kd_wq.log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCOMPILE_TEST_DATA=$PWD/.gpudata/cifar10-mini
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/nvidia-smi.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_transforms.py -k "cuda or auto or syncs or placed" \
  2>&1 | tee "$OUT/pytest.log" | tail -5
timeout 120 python3 -m runtime specs/student.spec --recipe kd_wq --device cuda --data .gpudata/cifar10-mini \
  --input 3x32x32 --epochs 3 --out /tmp/kdwq 2>&1 | grep -v Warning | tee "$OUT/kd_wq.log" | tail -12
timeout 240 python3 bench/bench_gpu.py --data .gpudata/cifar10-mini --input 3x128x128 --epochs 3 \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -12
