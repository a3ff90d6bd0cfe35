#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one go (issues 3, 4 and 6), most important
# first, each under its own time limit so that one failure does not cost the others.
# Run from the repository root on a CUDA machine with rts_thaw installed:
#     bash benchmarks/gpu_benchmarks.sh [LOG_DIR]
set -u
logs=${1:-gpu_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
world=${RTS_BENCH_WORLD:-/tmp/rts_thaw_bench_world}  # generated once, shared by the prediction runs

run() {  # run NAME SECONDS COMMAND...: log to $logs/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" | tee -a "$logs/gpu.txt"

# Issue 3: a training step at 512 px, batch 8, MViTv2-T encoders with detectron2's R50-FPN cascade
# heads (cascade_2fc: 2-fc 1024 box heads, no convs), beside torchvision; --flops adds GFLOP per
# image (untimed), so img/s x GFLOP gives each model's sustained rate. Not measured on a GPU yet.
run train_512_2fc 180 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --heads cascade_2fc --flops
# Issue 6: whole-scene prediction vs forward only; paper-scale model at 256 px tiles (masks now
# leave the GPU unpasted; the last GPU run predates that).
run predict_tiny 200 python benchmarks/bench_predict.py --device cuda --world "$world" --scenes 16 --size 1024 \
    --encoder mvitv2_tiny --heads cascade --tile-size 256 --batch-size 16 --workers 8 --write-workers 4
# Issue 6: the feeding loop's work per batch after the forward pass, pasted in the model vs handed over.
run mask_handoff 60 python benchmarks/bench_mask_handoff.py --device cuda
# Issue 3: the paper-scale step at 512 px, batch 8 (MViTv2-T, cascade heads), and where its time goes.
run train_512_fp32 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2
run train_512_breakdown 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --steps 5 --breakdown
# Issue 4: the same step at 256 px.
run train_256_fp32 120 python benchmarks/bench_train_step.py --device cuda --size 256 --warmup 2
# Issue 6, the light CPU-default model: the harder case for the pipeline (the model is fast).
run predict_micro 150 python benchmarks/bench_predict.py --device cuda --world "$world" --scenes 16 --size 1024 \
    --tile-size 128 --batch-size 32 --workers 8 --write-workers 4
# Issue 6 in bf16 autocast (prediction's precision=bf16-mixed).
run predict_tiny_bf16 150 python benchmarks/bench_predict.py --device cuda --world "$world" --scenes 16 --size 1024 \
    --encoder mvitv2_tiny --heads cascade --tile-size 256 --batch-size 16 --workers 8 --write-workers 4 --precision bf16-mixed
# Issue 3 in bf16 autocast.
run train_512_bf16 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --precision bf16-mixed

echo "== summary"
grep -h -A14 "^device=\|^device:\|^device " "$logs"/*.log
