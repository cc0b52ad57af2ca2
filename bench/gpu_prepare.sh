#!/usr/bin/env bash
# Prepare the one device call of bench/gpu_run.sh (run here, in the repository root, once per checkout):
#  - .whl/: wheels the GPU machine's Python 3.12 lacks: pydantic (+ core, annotated-types,
#    typing-inspection, a recent typing-extensions), lark, safetensors >= 0.8 (its image's may be
#    older), and optuna with its dependencies;
#    its image has pytest and hypothesis
#  - .gpudata/cifar10-mini: a subset of ../shared/data/cifar10-mini (only the checkout travels)
# Both folders are added to .git/info/exclude, so they are never committed; name them in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
per_class=${1:-500}
for d in /.whl/ /.gpudata/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
rm -rf .whl && mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection typing-extensions lark safetensors==0.8.0 \
  optuna==5.0.0 alembic sqlalchemy==2.1.9 colorlog Mako MarkupSafe packaging  # optuna: `nccompile study`
src=../shared/data/cifar10-mini
rm -rf .gpudata && mkdir -p .gpudata/cifar10-mini
for split in train val; do
  for cls in "$src/$split"/*/; do
    name=$(basename "$cls"); mkdir -p ".gpudata/cifar10-mini/$split/$name"
    ls "$cls" | sort | sed -n "1,${per_class}p" | while read -r f; do cp "$cls/$f" ".gpudata/cifar10-mini/$split/$name/"; done
  done
done
du -sh .whl .gpudata
