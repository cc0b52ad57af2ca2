#!/usr/bin/env bash
# What issue 8 still asks of a GPU, in one device call (prepare with bench/gpu_prepare.sh first):
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".gpudata"], timeout_s=590)
# Writes to $OUT: nvidia-smi.txt, pytest.log (every CUDA test: recipes, transforms, syncs, low-bit),
# bench_gpu.log/.json (train vs the tuned loop, 3 alternating repeats), idle.log (the tuned loop
# idling after each epoch, nccompile writing its checkpoints inline: does an idle GPU start the
# next epoch slower?), autotune_off.log (nccompile without cuDNN's autotuner), study.log, profile.log.
# Parts run in order of importance, each under its own timeout, so a late one cannot hide an early one.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/nvidia-smi.txt"
stamp pytest
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_transforms.py \
  tests/test_lowbit.py -k "cuda or auto or syncs or placed" 2>&1 | tee "$OUT/pytest.log" | tail -5
stamp bench train
timeout 170 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --steps train --repeats 3 \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -6
stamp bench idle
timeout 60 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --steps train --models teacher \
  --batch 256 --repeats 2 --idle 0.5 --checkpoints inline 2>&1 | grep -v -i warn | tee "$OUT/idle.log" | tail -3
stamp bench autotune off
timeout 60 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --steps train --models teacher \
  --batch 256 --repeats 2 --cudnn-benchmark off 2>&1 | grep -v -i warn | tee "$OUT/autotune_off.log" | tail -3
stamp study
timeout 50 python3 -m runtime study specs/studies/q4_quantization.yaml --device cuda --data $data --epochs 3 \
  --set data.limit_per_class=100 --out /tmp/q4 2>&1 | grep -v Warning | tee "$OUT/study.log" | tail -10
stamp profile
timeout 40 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 2 --steps train --models teacher \
  --batch 256 --repeats 1 --profile 2>&1 | grep -v -i warn > "$OUT/profile.log"; tail -3 "$OUT/profile.log"
stamp done
