#!/usr/bin/env bash
# The GPU speed measurements of docs/benchmarks.md in one call of under 8 minutes: the training
# step and whole-scene prediction at paper scale, each with the speed switches (bf16 autocast,
# fused AdamW, channels-last, torch.compile) beside torchvision's Mask R-CNN in float32 and
# bf16, most important first, each under its own time limit so that one failure does not
# cost the others. The accuracy of the switches: benchmarks/gpu_accuracy.sh.
# Run from the repository root on a CUDA machine with rts_thaw installed:
#     bash benchmarks/gpu_benchmarks.sh [LOG_DIR] [PARTS]     # PARTS: "train predict" (the default), or one
# The commands of earlier sessions' tables are given beside them in docs/benchmarks.md.
set -u
logs=${1:-gpu_logs}
parts=${2:-train predict}
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

if [[ $parts == *predict* ]]; then
# The prediction runs' world (8 scenes of 1024 px), drawn on 8 of the CPU cores while the
# training step is timed (that step keeps one core busy).
python - "$world" >"$logs/world.log" 2>&1 <<'EOF' &
import sys
from pathlib import Path
from rts_thaw.data.synthetic import WorldParams, generate_world
params = WorldParams(scenes=8, size=1024, seed=11)  # bench_predict's world for --scenes 8 --size 1024
target = Path(sys.argv[1]) / f"synthetic_{params.key()}"
if not (target / "scenes.yaml").exists():
    generate_world(target, params, workers=8)
EOF
world_job=$!
fi

# Issue 19: the staged 3-modality cascade (detectron2's R50-FPN cascade heads) at 512 px, batch 8:
# switches added in turn, beside torchvision in float32 and bf16; --flops adds GFLOP per image and
# each row's sustained TFLOPS. Compiled: the parts whose shapes are fixed at a given tile size (the
# RoI heads see a different number of boxes each step, and would be compiled again and again).
[[ $parts == *train* ]] && run train_512_switches 230 python benchmarks/bench_train_step.py --device cuda --size 512 --warmup 3 \
    --heads cascade_2fc --flops --models staged_cascade,torchvision_maskrcnn_r50 --peer-settings fp32,bf16 \
    --settings fp32,bf16,bf16+fused+channels_last,bf16+fused+channels_last+compile --compile-parts encoders,fusion,neck

if [[ $parts == *predict* ]]; then
wait "$world_job"
# Issue 19: whole-scene prediction, paper-scale model (mvitv2_tiny + cascade) on 256 px tiles,
# every scene listed 4 times, 2 detections per tile: bf16 with the switches, then float32.
P="python benchmarks/bench_predict.py --device cuda --world $world --scenes 8 --size 1024 --encoder mvitv2_tiny \
    --heads cascade --tile-size 256 --batch-size 16 --workers 8 --write-workers 4 --repeat 4 --max-detections 2"
run predict_tiny_bf16_switches 100 $P --precision bf16-mixed --channels-last --compile encoders,fusion,neck
run predict_tiny_fp32 50 $P
fi

echo "== summary"
grep -h -A30 "^device=" "$logs"/train_*.log 2>/dev/null
grep -h -B1 -A8 "^device:" "$logs"/predict_*.log 2>/dev/null
