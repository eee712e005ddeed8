#!/usr/bin/env bash
# The GPU measurements issues 3, 5, 14, 20, 21, 22, 29 and 30 ask for, in one run (about 8 minutes on an H100/H200).
#
#   bash benchmarks/gpu_check.sh prepare   # here, in the repo root: wheels and golden data to carry
#   bash benchmarks/gpu_check.sh run       # on the GPU machine, with carry [".whl", ".golden"]
#   bash benchmarks/gpu_check.sh run --dry-run   # here, on the CPU: every command, tiny and short
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
    cp -r ../shared/golden/images ../shared/golden/gt ../shared/golden/labels.json \
        ../shared/golden/tiny-clip-vit-b16-random.pt ../shared/golden/deeplab .golden/
    du -sh .whl .golden
}

run() {
    # --dry-run: every command below on the CPU, small (tiny model, few images), to check the script
    local dry=${DRY_RUN:-0} dev=cuda big=ViT-B-16 golden=.golden
    local n=256 nb=32 nf=2048 warm=256 workers=12 copies=16 steps=20 size=513 crop=448
    if [ "$dry" = 1 ]; then
        [ -d .golden ] || golden=../shared/golden
        dev=cpu big=$golden/tiny-clip-vit-b16-random.pt n=2 nb=2 nf=6 warm=2 workers=1 copies=1 steps=1 size=96 crop=64
        export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    else
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
        nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    fi
    local py=${PYTHON:-python3} out=${OUT:-benchmarks/results} tiny=$golden/tiny-clip-vit-b16-random.pt
    [ "$dry" = 1 ] && out=${OUT:-$(mktemp -d)}
    mkdir -p "$out"
    echo "results -> $out (device $dev, dry run: $dry)"
    # issue 22: the engine, authors-style loop against batched, in the default dtype (auto: bf16 on a GPU)
    # and fp32, with the trunk's share; --profile prints the busiest kernels (target: >= 500 img/s end to end)
    $py benchmarks/label_throughput.py --device $dev --model $big --dtype auto --images $n --batch-size $nb \
        --size $size --profile --json "$out/label_throughput_gpu_auto.json"
    $py benchmarks/label_throughput.py --device $dev --model $big --dtype float32 --images $((n / 2 > 0 ? n / 2 : 1)) \
        --batch-size $nb --size $size --modes batched --json "$out/label_throughput_gpu_fp32.json"
    # issue 22: clipes label end to end on a folder of VOC-sized JPEGs, default dtype and bf16
    $py benchmarks/label_folder.py --device $dev --model $big --dtype auto --images $nf --warmup $warm \
        --workers $workers --json "$out/label_folder_gpu_auto.json"
    # issue 22: bf16 and fp16 (vision weights cast once) against fp32 pseudo masks on the golden photos
    for dt in bfloat16 float16; do
        $py benchmarks/dtype_agreement.py --device $dev --images $golden/images --labels $golden/labels.json \
            --model $tiny --dtype $dt --json "$out/dtype_agreement_gpu_tiny_$dt.json"
    done
    $py benchmarks/dtype_agreement.py --device $dev --images $golden/images --labels $golden/labels.json \
        --model $big --json "$out/dtype_agreement_gpu_vitb16.json"
    # issue 14: the torch dense CRF on the golden photos in batches, then CLIP-ES's training labels
    # (clipes label --crf --crf-backend torch --confidence 0.95) end to end, bf16, on VOC-sized JPEGs made
    # from the golden photos (random colour fields would make the CRF's lattice 4x larger); bar: >= 150 img/s
    $py benchmarks/crf_backends.py --device $dev --backends torch --copies $copies --json "$out/crf_backends_gpu.json"
    $py benchmarks/label_folder.py --device $dev --model $big --dtype bfloat16 --images $nf --warmup $warm \
        --workers $workers --crf-backend torch --confidence 0.95 --photos $golden/images \
        --json "$out/label_folder_gpu_bf16_crf_torch.json"
    # issue 30: clipes segment --crf's torch CRF on the device against the CPU reference (pydensecrf where
    # installed, else torch on the CPU), 21 classes on the golden photos; bar: >= 99.9% of pixels
    $py benchmarks/segment_crf.py --device $dev --golden $golden --json "$out/segment_crf_gpu.json"
    # issue 5: ViT-B/16 + linear head, batch 16, crop 448, bf16
    $py benchmarks/train_step.py --model clip-linear --clip-model ViT-B-16 --batch-size $((nb / 2 > 0 ? nb / 2 : 1)) \
        --crop $crop --bf16 --steps $steps --device $dev | tee "$out/train_step_gpu_vitb16_linear_bf16.json"
    # issue 23: SETR's decoders on ViT-B/16 at their preset's batch and crop (16 x 480), encoder frozen, bf16
    for m in clip-linear clip-segmenter clip-setr-naive clip-setr-pup clip-setr-mla; do
        $py benchmarks/train_step.py --model "$m" --clip-model ViT-B-16 --batch-size $((nb / 2 > 0 ? nb / 2 : 1)) \
            --crop $((crop + 32)) --bf16 --steps $steps --device $dev | tee "$out/train_step_gpu_vitb16_${m}_480_bf16.json"
    done
    # issue 20: deeplab-pytorch's DeepLab-v2 MSC against the golden iteration (errors relative to each array's
    # largest value; the CPU test's bar is 1e-4), and one step of its recipe (batch 5, crop 321)
    $py benchmarks/deeplab_parity.py --device $dev --golden $golden/deeplab/deeplabv2_msc.npz \
        --json "$out/deeplab_parity_gpu.json"
    $py benchmarks/train_step.py --model deeplabv2-resnet101 --batch-size $((dry == 1 ? 1 : 5)) \
        --crop $((dry == 1 ? crop : 321)) --steps $((dry == 1 ? 1 : 10)) --device $dev \
        | tee "$out/train_step_gpu_deeplabv2_msc_fp32.json"
    # issues 21 and 29: GradCAM, GETAM and the dense methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP; their words
    # embedded) side by side (images/s, peak memory), bf16 and fp32; GETAM's bf16 masks against fp32
    $py benchmarks/cam_methods.py --device $dev --model $big --dtype bfloat16 --images $n --batch-size $nb \
        --size $size --real-queries --json "$out/cam_methods_gpu_bf16.json"
    $py benchmarks/cam_methods.py --device $dev --model $big --dtype float32 --images $((n / 2 > 0 ? n / 2 : 1)) \
        --batch-size $nb --size $size --real-queries --json "$out/cam_methods_gpu_fp32.json"
    $py benchmarks/dtype_agreement.py --device $dev --images $golden/images --labels $golden/labels.json \
        --model $big --cam getam --json "$out/dtype_agreement_gpu_vitb16_getam.json"
}

case "${1:-}" in
    prepare) prepare ;;
    run) [ "${2:-}" = --dry-run ] && DRY_RUN=1; run ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare | run [--dry-run]" >&2; exit 2 ;;
esac
