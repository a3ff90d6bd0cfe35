#!/usr/bin/env bash
# Does a speed switch change what training learns? The README's staged fusion on the embedded
# synthetic world, on a GPU: float32 over 3 seeds (the run-to-run spread), then seed 0 with each
# switch of training.speed and trainer.precision=bf16-mixed, and with all of them. Stage 1 runs
# first as parallel cached jobs (bf16 has its own stage-1 models: precision is part of their key);
# the staged runs then find them and train stage 2 in parallel. Last, the float32 checkpoints are
# scored again with a bfloat16 forward (evaluate trainer.precision=bf16-mixed), the AP that
# prediction in bf16 would keep. Prints one table of test mask/box AP50.
#     bash benchmarks/gpu_accuracy.sh [LOG_DIR]        # ~4 minutes on an H200 with 16 CPU cores
# RTS_SPEED_SEEDS (default "0 1 2") and RTS_SPEED_SWITCHES (default "bf16 fused channels_last compile all")
# choose a shorter run; benchmarks/speed_accuracy_table.py prints the table of whatever has finished.
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

echo "== stage 1: 3 modalities x each seed in float32, x seed 0 in bf16"
seeds=${RTS_SPEED_SEEDS:-0 1 2}
chosen=${RTS_SPEED_SWITCHES:-bf16 fused channels_last compile all}
for seed in $seeds; do
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

echo "== stage 2: float32 x each seed, each switch at seed 0"
for seed in $seeds; do
    python -m rts_thaw.train +experiment=staged_fusion seed=$seed $common name=speed_fp32 \
        >"$logs/accuracy_fp32_$seed.log" 2>&1 &
done
for switch in $chosen; do
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

python "$(dirname "$0")/speed_accuracy_table.py" "$RTS_THAW_LOG_DIR" | tee "$logs/accuracy_summary.txt"
