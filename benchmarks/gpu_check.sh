#!/usr/bin/env bash
# The GPU measurements issues 3 and 5 ask for, in one run (about 5 minutes on an H100/H200).
#
# The lent GPU machine has torch, typer, rich, pyyaml, pillow and timm but not open_clip, so carry
# wheels. Prepare them on the development machine, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth
# then run, with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_check.sh
set -euo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# labelling: the reference-style loop against the batched engine, bf16 and fp32
python3 benchmarks/label_throughput.py --device cuda --dtype bfloat16 --images 256 --batch-size 32 \
    --json "$out/label_throughput_gpu_bf16.json"
python3 benchmarks/label_throughput.py --device cuda --dtype float32 --images 128 --batch-size 32 --modes batched \
    --json "$out/label_throughput_gpu_fp32.json"
# segmenter: ViT-B/16 + linear head, batch 16, crop 448, bf16
python3 benchmarks/train_step.py --model clip-linear --clip-model ViT-B-16 --batch-size 16 --crop 448 --bf16 \
    --steps 20 --device cuda | tee "$out/train_step_gpu_vitb16_linear_bf16.json"
