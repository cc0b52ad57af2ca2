#!/usr/bin/env bash
# Everything issue 8 asks of a GPU, in one device call (prepare with bench/gpu_prepare.sh first):
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".gpudata"], timeout_s=500)
# Writes to $OUT: nvidia-smi.txt, pytest.log (CUDA tests), kd_wq.log, torchrun.log,
# bench_gpu.log/.json (eager) and bench_compile.log/.json (the moonshot: CUDA graphs at batch 64).
# Parts run in order of importance, each under its own timeout, so a late one cannot hide an early one.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/nvidia-smi.txt"
stamp pytest
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_transforms.py \
  -k "cuda or auto or syncs or placed" 2>&1 | tee "$OUT/pytest.log" | tail -5
stamp kd_wq
timeout 75 python3 -m runtime specs/student.spec --recipe kd_wq --device cuda --data $data \
  --input 3x32x32 --epochs 3 --out /tmp/kdwq 2>&1 | grep -v Warning | tee "$OUT/kd_wq.log" | tail -8
stamp torchrun
NCCL_DEBUG=VERSION timeout 45 python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29531 -m runtime specs/student.spec \
  --recipe scratch --device cuda --data $data --set data.limit_per_class=100 --epochs 2 --out /tmp/ddp \
  2>&1 | grep -v Warning | tee "$OUT/torchrun.log" | tail -4; grep -c "ran" /tmp/ddp/report.json
stamp bench eager
timeout 150 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -9
stamp bench compile
timeout 60 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --batch 64 --models student \
  --compile reduce-overhead --json "$OUT/bench_compile.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_compile.log" \
  | tail -4
stamp done
