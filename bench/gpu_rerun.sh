#!/usr/bin/env bash
# The second device call of a session: the eager benchmark again and the compile moonshot with more time.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
stamp pytest
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py -k "syncs" 2>&1 | tee "$OUT/pytest.log" | tail -3
stamp bench eager
timeout 130 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu.log" | tail -9
stamp bench compile
timeout 230 python3 bench/bench_gpu.py --data $data --input 3x128x128 --epochs 3 --batch 64 --models student \
  --steps train --compile reduce-overhead --json "$OUT/bench_compile.json" 2>&1 | grep -v -i warn \
  | tee "$OUT/bench_compile.log" | tail -4
stamp done
