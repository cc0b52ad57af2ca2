#!/usr/bin/env bash
# What issue 8 still asks of a GPU, in one device call (prepare with bench/gpu_prepare.sh first):
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".gpudata"], timeout_s=590)
# Writes to $OUT: nvidia-smi.txt, pytest.log (every CUDA test: recipes, transforms, syncs, low-bit,
# whole-step CUDA graphs against eager steps), bench_gpu.log/.json (train and distill vs the tuned
# loop, nccompile with CUDA graphs (the default) and without: 4 epochs, 3 alternating repeats, because
# the tuned loop alone moved by up to 1.4x between repeats in earlier calls), cosine.log (the
# student at batch 64 with a cosine schedule: a new learning rate every epoch, graphs against eager),
# qat.log (quantization-aware training: per-tensor rounding against one pass, bench/bench_qat.py).
# Parts run in order of importance, each under its own timeout, so a late one cannot hide an early one.
# (The previous version, with the --idle and --cudnn-benchmark diagnostics, is in git history; its
# findings are in BENCHMARKS.md, "A later H200 session".)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, safetensors; print(torch.__version__, torch.cuda.get_device_name(), 'safetensors', safetensors.__version__)" \
  | tee -a "$OUT/nvidia-smi.txt"
stamp pytest
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_transforms.py \
  tests/test_lowbit.py tests/test_checkpoints.py tests/test_trainstep.py -k "cuda or auto or syncs or placed or checkpoint or write" 2>&1 \
  | tee "$OUT/pytest.log" | tail -5
stamp bench
timeout 340 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 4 --steps train distill --repeats 3 \
  --cuda-graphs on off --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -8
stamp cosine
# a learning rate that changes every epoch: refilled into the graphs' tensors, should cost nothing
timeout 45 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 4 --steps train --models student \
  --batch 64 --repeats 1 --schedule cosine --cuda-graphs on off 2>&1 | grep -v -i warn | tee "$OUT/cosine.log" | tail -3
stamp qat
timeout 60 python3 bench/bench_qat.py --device cuda 2>&1 | grep -v -i warn | tee "$OUT/qat.log" | tail -5
timeout 40 python3 bench/bench_qat.py --device cuda --batch 256 2>&1 | grep -v -i warn | tee -a "$OUT/qat.log" | tail -4
stamp done
