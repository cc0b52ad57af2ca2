#!/usr/bin/env bash
# Follow-up device call after bench/gpu_run.sh found (1) background checkpoint writes slowing the
# next epoch (teacher, batch 256: 0.57x the tuned loop, 1.02x with inline writes) and (2) calibrated
# rounding failing on CUDA (ranges on the GPU, the file's tensors on the host). Checks both fixes:
#   run(command="bash bench/gpu_rerun.sh", carry=[".whl", ".gpudata"], timeout_s=300)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, safetensors; print(torch.__version__, torch.cuda.get_device_name(), 'safetensors', safetensors.__version__)" \
  | tee "$OUT/versions.txt"
stamp pytest
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_lowbit.py tests/test_devices.py \
  -k "(calibrated and cuda) or kd_wq-cuda or scratch-cuda or autotuning" 2>&1 | tee "$OUT/pytest.log" | tail -4
stamp checkpoint
timeout 40 python3 bench/bench_checkpoint.py --device cuda 2>&1 | tee "$OUT/checkpoint.log" | tail -3
stamp bench train
timeout 120 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --steps train --repeats 3 \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -6
stamp bench inline
timeout 45 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --steps train --models teacher \
  --batch 256 --repeats 2 --checkpoints inline 2>&1 | grep -v -i warn | tee "$OUT/inline.log" | tail -3
stamp done
