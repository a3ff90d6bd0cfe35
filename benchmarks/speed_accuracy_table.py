"""The table of benchmarks/gpu_accuracy.sh: test mask/box AP50 and training speed of each finished
speed_* run under a log folder, with the mask AP50 its checkpoint keeps under a bfloat16 forward,
and the float32 runs' mean and spread over seeds. Runs that have not finished are left out, so it
can be run on what a stopped script left.
    python benchmarks/speed_accuracy_table.py RTS_THAW_LOG_DIR
"""

import json
import statistics
import sys
from pathlib import Path

from rts_thaw.reporting.collect import scores_in_percent


def main(log_dir: str) -> None:
    rows = []
    for results in sorted(Path(log_dir).glob("speed_*/*/results.json")):
        r = scores_in_percent(json.loads(results.read_text()), "test", results)  # percent, older files too
        config = (results.parent / "config.yaml").read_text()
        seed = next(line.split(":")[1].strip() for line in config.splitlines() if line.startswith("seed:"))
        bf16_forward = results.parent / "metrics_bf16_forward.json"
        forward = (scores_in_percent(json.loads(bf16_forward.read_text()), "metrics", bf16_forward)["metrics"]
                   if bf16_forward.exists() else {})
        rows.append((results.parent.parent.name, seed, r["test"]["segm_AP50"], r["test"]["bbox_AP50"],
                     r.get("perf/train_images_per_s"), forward.get("segm_AP50")))
    print(f"{'run':<20} {'seed':>4} {'mask AP50':>9} {'box AP50':>8} {'train img/s':>11} {'mask AP50, bf16 forward':>24}")
    for name, seed, mask, box, speed, forward in rows:
        print(f"{name:<20} {seed:>4} {mask:>9.1f} {box:>8.1f} {speed or float('nan'):>11.1f} "
              f"{'' if forward is None else f'{forward:.1f}':>24}")
    base = [mask for name, _, mask, *_ in rows if name == "speed_fp32"]
    if len(base) > 1:
        print(f"float32 over {len(base)} seeds: mask AP50 {statistics.mean(base):.1f} +- {statistics.stdev(base):.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
