#!/usr/bin/env bash
# Does a speed switch change what training learns? The README's staged fusion on the embedded
# synthetic world, on a GPU: float32 over 3 seeds (the run-to-run spread), then seed 0 with each
# switch of training.speed and trainer.precision=bf16-mixed, and with all of them. Stage 1 runs
# first as parallel cached jobs (bf16 has its own stage-1 models: precision is part of their key);
# the staged runs then find them and train stage 2 in parallel. Last, the float32 checkpoints are
# scored again with a bfloat16 forward (evaluate trainer.precision=bf16-mixed), the AP that
# prediction in bf16 would keep. Prints one table of test mask/box AP50.
#     bash benchmarks/gpu_accuracy.sh [LOG_DIR]        # ~4 minutes on an H200 with 16 CPU cores
set -u
logs=${1:-gpu_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export RTS_THAW_CACHE=${RTS_THAW_CACHE:-/tmp/rts_thaw_speed_cache} RTS_THAW_LOG_DIR=${RTS_THAW_LOG_DIR:-/tmp/rts_thaw_speed_runs}
# RTS_SPEED_EXTRA: overrides added to every run (a dry run of this script on a CPU, say)
common="trainer=gpu logger=csv trainer.enable_progress_bar=false ${RTS_SPEED_EXTRA:-}"
compile_parts="[encoders,fusion,neck,box_heads,mask_head]"
declare -A switches=(
    [fp32]=""
    [bf16]="trainer.precision=bf16-mixed"
    [fused]="training.speed.fused_optimizer=true"
    [channels_last]="training.speed.channels_last=true"
    [compile]="training.speed.compile=$compile_parts"
    [all]="trainer.precision=bf16-mixed training.speed.fused_optimizer=true training.speed.channels_last=true training.speed.compile=$compile_parts"
)

# the default world, drawn once before the parallel jobs ask for it
python -c "from rts_thaw.data.synthetic import ensure_world; print(ensure_world('$RTS_THAW_CACHE/data'))"

echo "== stage 1: 3 modalities x 3 seeds in float32, x seed 0 in bf16"
for seed in 0 1 2; do
    for m in rgb ndvi nir; do
        python -m rts_thaw.train +experiment=unimodal "data.modalities=[$m]" training.stage1_cache=true \
            seed=$seed $common name=stage1_fp32 >"$logs/accuracy_stage1_${m}_$seed.log" 2>&1 &
    done
done
for m in rgb ndvi nir; do
    python -m rts_thaw.train +experiment=unimodal "data.modalities=[$m]" training.stage1_cache=true \
        seed=0 $common trainer.precision=bf16-mixed name=stage1_bf16 >"$logs/accuracy_stage1_${m}_bf16.log" 2>&1 &
done
wait

echo "== stage 2: float32 x 3 seeds, each switch at seed 0"
for seed in 0 1 2; do
    python -m rts_thaw.train +experiment=staged_fusion seed=$seed $common name=speed_fp32 \
        >"$logs/accuracy_fp32_$seed.log" 2>&1 &
done
for switch in bf16 fused channels_last compile all; do
    python -m rts_thaw.train +experiment=staged_fusion seed=0 $common name=speed_$switch ${switches[$switch]} \
        >"$logs/accuracy_$switch.log" 2>&1 &
done
wait

echo "== the float32 checkpoints scored with a bfloat16 forward"
for results in "$RTS_THAW_LOG_DIR"/speed_fp32/*/results.json; do
    run=$(dirname "$results")
    python -m rts_thaw.evaluate "ckpt_path=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" "$results")" \
        trainer.precision=bf16-mixed trainer.enable_progress_bar=false output="$run/metrics_bf16_forward.json" \
        >"$logs/accuracy_eval_bf16_$(basename "$run").log" 2>&1 &
done
wait

python - "$RTS_THAW_LOG_DIR" <<'EOF' | tee "$logs/accuracy_summary.txt"
import json, statistics, sys
from pathlib import Path

rows = []
for results in sorted(Path(sys.argv[1]).glob("speed_*/*/results.json")):
    r = json.loads(results.read_text())
    config = (results.parent / "config.yaml").read_text()
    seed = next(line.split(":")[1].strip() for line in config.splitlines() if line.startswith("seed:"))
    bf16_forward = results.parent / "metrics_bf16_forward.json"
    forward = json.loads(bf16_forward.read_text())["metrics"] if bf16_forward.exists() else {}
    rows.append((results.parent.parent.name, seed, 100 * r["test"]["segm_AP50"], 100 * r["test"]["bbox_AP50"],
                 r.get("perf/train_images_per_s"), 100 * forward["segm_AP50"] if "segm_AP50" in forward else None))
print(f"{'run':<20} {'seed':>4} {'mask AP50':>9} {'box AP50':>8} {'train img/s':>11} {'mask AP50, bf16 forward':>24}")
for name, seed, mask, box, speed, forward in rows:
    print(f"{name:<20} {seed:>4} {mask:>9.1f} {box:>8.1f} {speed or float('nan'):>11.1f} "
          f"{'' if forward is None else f'{forward:.1f}':>24}")
base = [mask for name, _, mask, *_ in rows if name == "speed_fp32"]
if len(base) > 1:
    print(f"float32 over {len(base)} seeds: mask AP50 {statistics.mean(base):.1f} +- {statistics.stdev(base):.1f}")
EOF
