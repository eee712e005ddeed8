#!/usr/bin/env bash
# The GPU measurements issues 3, 5, 14, 20 and 21 ask for, in one run (about 6 minutes on an H100/H200).
#
#   bash benchmarks/gpu_check.sh prepare   # here, in the repo root: wheels and golden data to carry
#   bash benchmarks/gpu_check.sh run       # on the GPU machine, with carry [".whl", ".golden"]
#
# The lent GPU machine (Python 3.12) has torch, torchvision, typer, rich, pyyaml, pillow, regex,
# timm and huggingface_hub but not open_clip, whose wheels travel in .whl/; ../shared/golden does
# not travel, so a copy goes in .golden/. Both folders are git-ignored through .git/info/exclude.
# Results land in $OUT (the device tool's folder) or benchmarks/results.
set -euo pipefail

prepare() {
    for d in /.whl/ /.golden/; do
        grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
    rm -rf .golden && mkdir .golden
    cp -r ../shared/golden/images ../shared/golden/labels.json ../shared/golden/tiny-clip-vit-b16-random.pt \
        ../shared/golden/deeplab .golden/
    du -sh .whl .golden
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    local out=${OUT:-benchmarks/results}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    # issue 3: the engine, reference-style loop against batched, bf16 and fp32 (random ViT-B/16, 513x513)
    python3 benchmarks/label_throughput.py --device cuda --dtype bfloat16 --images 256 --batch-size 32 --profile \
        --json "$out/label_throughput_gpu_bf16.json"
    python3 benchmarks/label_throughput.py --device cuda --dtype float32 --images 128 --batch-size 32 \
        --modes batched --json "$out/label_throughput_gpu_fp32.json"
    # issue 3: clipes label end to end on a folder of VOC-sized JPEGs
    python3 benchmarks/label_folder.py --device cuda --dtype bfloat16 --images 2048 --warmup 256 --workers 12 \
        --json "$out/label_folder_gpu_bf16.json"
    # issue 3: bf16 against fp32 pseudo masks on the golden photos, tiny and full-size random models
    python3 benchmarks/dtype_agreement.py --device cuda --images .golden/images --labels .golden/labels.json \
        --model .golden/tiny-clip-vit-b16-random.pt --json "$out/dtype_agreement_gpu_tiny.json"
    python3 benchmarks/dtype_agreement.py --device cuda --images .golden/images --labels .golden/labels.json \
        --model ViT-B-16 --json "$out/dtype_agreement_gpu_vitb16.json"
    # issue 14: the torch dense CRF on the golden photos in batches of 16, then CLIP-ES's training labels
    # (clipes label --crf --crf-backend torch --confidence 0.95) end to end, bf16, on VOC-sized JPEGs made
    # from the golden photos (random colour fields would make the CRF's lattice 4x larger); bar: >= 150 img/s
    python3 benchmarks/crf_backends.py --device cuda --backends torch --copies 16 --json "$out/crf_backends_gpu.json"
    python3 benchmarks/label_folder.py --device cuda --dtype bfloat16 --images 2048 --warmup 256 --workers 12 \
        --crf-backend torch --confidence 0.95 --photos .golden/images --json "$out/label_folder_gpu_bf16_crf_torch.json"
    # issue 5: ViT-B/16 + linear head, batch 16, crop 448, bf16
    python3 benchmarks/train_step.py --model clip-linear --clip-model ViT-B-16 --batch-size 16 --crop 448 --bf16 \
        --steps 20 --device cuda | tee "$out/train_step_gpu_vitb16_linear_bf16.json"
    # issue 23: SETR's decoders on ViT-B/16 at their preset's batch and crop (16 x 480), encoder frozen, bf16
    for m in clip-linear clip-segmenter clip-setr-naive clip-setr-pup clip-setr-mla; do
        python3 benchmarks/train_step.py --model "$m" --clip-model ViT-B-16 --batch-size 16 --crop 480 --bf16 \
            --steps 20 --device cuda | tee "$out/train_step_gpu_vitb16_${m}_480_bf16.json"
    done
    # issue 20: deeplab-pytorch's DeepLab-v2 MSC on the GPU against the golden iteration (errors relative to
    # each array's largest value; the CPU test's bar is 1e-4), and one step of its recipe (batch 5, crop 321)
    python3 benchmarks/deeplab_parity.py --device cuda --golden .golden/deeplab/deeplabv2_msc.npz \
        --json "$out/deeplab_parity_gpu.json"
    python3 benchmarks/train_step.py --model deeplabv2-resnet101 --batch-size 5 --crop 321 --steps 10 --device cuda \
        | tee "$out/train_step_gpu_deeplabv2_msc_fp32.json"
    # issue 21: GETAM against GradCAM (images/s, peak memory), bf16 and fp32; GETAM's bf16 masks against fp32
    python3 benchmarks/cam_methods.py --device cuda --dtype bfloat16 --images 256 --batch-size 32 \
        --json "$out/cam_methods_gpu_bf16.json"
    python3 benchmarks/cam_methods.py --device cuda --dtype float32 --images 128 --batch-size 32 \
        --json "$out/cam_methods_gpu_fp32.json"
    python3 benchmarks/dtype_agreement.py --device cuda --images .golden/images --labels .golden/labels.json \
        --model ViT-B-16 --cam getam --json "$out/dtype_agreement_gpu_vitb16_getam.json"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
