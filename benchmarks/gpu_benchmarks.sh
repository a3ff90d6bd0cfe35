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

# Issue 6: whole-scene prediction vs forward only; paper-scale model at 256 px tiles, every scene
# listed 4 times (--repeat). 2 detections per tile first (still heavier than a trained model's
# load), then the 20-per-tile stress load.
P="python benchmarks/bench_predict.py --device cuda --world $world --scenes 16 --size 1024 --encoder mvitv2_tiny \
    --heads cascade --tile-size 256 --batch-size 16 --workers 8 --repeat 4"
# 3 rounds alternate the forward-only pass and the pipeline: the forward rate alone varied from
# 72.6 to 85.4 tiles/s between runs of one command on the H200, so one pass of each can put the
# device's drift into the ratio.
run predict_tiny_md2 220 $P --write-workers 4 --max-detections 2 --rounds 3
# Fewer torch threads in the mapping process (its pin-memory copies use torch's thread pool, a
# thread per core by default, beside 8 reading and 4 writing processes): single runs on the
# H200 gave +3.4..+11.5 ms per batch of inference with 2 threads against +15..+24 with the default.
run predict_tiny_md2_threads2 220 $P --write-workers 4 --max-detections 2 --rounds 3 --threads 2
run predict_tiny_md2_threads1 220 $P --write-workers 4 --max-detections 2 --rounds 3 --threads 1
# The same load over a 4x longer run: the run's fixed costs (start-up, the last scene's
# writing) weigh as little as in a mapping run that lasts hours (98.7% in one run on the H200).
run predict_tiny_md2_r16 260 ${P/--repeat 4/--repeat 16} --write-workers 4 --max-detections 2
run predict_tiny_md20 130 $P --write-workers 8
# Issue 6: the feeding loop's work per batch after the forward pass, pasted in the model vs handed over.
run mask_handoff 60 python benchmarks/bench_mask_handoff.py --device cuda --repeats 10
# Issue 6: the writers' cold start: the caller held up, writers ready (CPU-side; 16 cores here).
run writer_start 150 python benchmarks/bench_writer_start.py --writers 4 --rounds 3
# Issue 3: a training step at 512 px, batch 8, with detectron2's R50-FPN cascade heads (cascade_2fc)
# and with the paper's (cascade), beside torchvision; --flops adds GFLOP per image (untimed),
# --breakdown the milliseconds of each part.
run train_512_2fc 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --heads cascade_2fc --flops
run train_512_2fc_breakdown 120 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --steps 5 \
    --heads cascade_2fc --breakdown
run train_512_fp32 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2
run train_512_breakdown 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --steps 5 --breakdown
# Issue 4: the same step at 256 px.
run train_256_fp32 120 python benchmarks/bench_train_step.py --device cuda --size 256 --warmup 2
# Issue 6, the light CPU-default model: the harder case for the pipeline (the model is fast).
run predict_micro 150 python benchmarks/bench_predict.py --device cuda --world "$world" --scenes 16 --size 1024 \
    --tile-size 128 --batch-size 32 --workers 8 --write-workers 8 --repeat 4
# Issue 6 in bf16 autocast (prediction's precision=bf16-mixed).
run predict_tiny_bf16 150 $P --write-workers 4 --max-detections 2 --precision bf16-mixed
# Issue 3 in bf16 autocast.
run train_512_bf16 150 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 2 --precision bf16-mixed

echo "== summary"
grep -h -A14 "^device=\|^device:\|^device " "$logs"/*.log
