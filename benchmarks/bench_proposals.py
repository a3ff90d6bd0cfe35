"""Mapping speed and quality against the number of RPN proposals per tile (`tiling.proposals`),
side by side in one run, the checkpoint's own count first (the peer: what training configured,
detectron2's 1000 at paper scale).

    python benchmarks/bench_proposals.py --ckpt run/best.ckpt --scenes scenes.yaml --proposals 50 20 10

Each setting maps the same scenes with `rts_thaw.mapping.map_scenes` (read -> infer -> paste ->
merge -> vectorise -> write) and scores the polygons against each scene's `labels` layer
(precision, recall and F1 at IoU >= 0.5, pooled over scenes). The RoI heads run once per
proposal and cascade stage, so they are most of the model's cost at paper scale; this shows
what a smaller count costs in slumps found. Settings alternate over `--repeats` rounds and
the median time is reported.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from rts_thaw.data.geotiff import load_scene_list
from rts_thaw.eval.polygons import evaluate_polygons, precision_recall_f1
from rts_thaw.mapping.map_scenes import load_model, map_scenes, resolve_device
from rts_thaw.mapping.engine import TilingConfig
from rts_thaw.core.vectors import read_layer


def scene_subset(scene_list: Path, splits: list[str], folder: Path) -> Path:
    """A scene list of the scenes in `splits` that have labels (absolute paths)."""
    chosen = [s for s in load_scene_list(scene_list) if s.labels and ("all" in splits or s.split in splits)]
    if not chosen:
        raise SystemExit(f"{scene_list}: no labelled scene in splits {splits}")
    entries = [{"id": s.id, "split": s.split, "labels": str(s.labels),
                "rasters": {m: str(p) for m, p in s.rasters.items()}} for s in chosen]
    path = folder / "scenes.yaml"
    path.write_text(yaml.safe_dump({"scenes": entries}))
    return path


def pooled_scores(summaries: list[dict], scenes: Path, maps: Path, iou: float) -> dict:
    totals = {"n_predicted": 0, "false_positives": 0, "n_true": 0, "true_positives": 0}
    for spec in load_scene_list(scenes):
        report = evaluate_polygons(read_layer(maps / f"{spec.id}.gpkg"), read_layer(spec.labels), iou)
        for key in totals:
            totals[key] += report[key]
    mapped, true = totals["n_predicted"], totals["n_true"]
    scores = precision_recall_f1(mapped - totals["false_positives"], mapped, totals["true_positives"], true)
    return {**scores, "true": true, "mapped": mapped, "tiles": sum(s["tiles"] - s["empty_tiles"] for s in summaries)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--scenes", required=True, help="scene list whose scenes have `labels`")
    p.add_argument("--splits", nargs="+", default=["val", "test"], help="scene splits to map ('all' for every one)")
    p.add_argument("--proposals", nargs="+", type=int, required=True, help="counts to compare with the checkpoint's")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="tile-reading workers (8 on a 16-core GPU machine)")
    p.add_argument("--write-workers", type=int, default=0, help="scene-finishing processes (0: a thread)")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_model(args.ckpt, device)
    own = model.detector.rpn.test_proposals
    settings = [None] + [n for n in args.proposals if n != own]
    work = Path(tempfile.mkdtemp(prefix="bench_proposals_"))
    try:
        scenes = scene_subset(Path(args.scenes), args.splits, work)
        seconds: dict = {n: [] for n in settings}
        scores = {}
        for round_ in range(args.repeats):  # settings alternate, so load from other jobs hits them alike
            for n in settings:
                tiling = TilingConfig(tile_size=model.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                                      num_workers=args.workers, write_workers=args.write_workers,
                                      score_threshold=args.score_threshold,
                                      proposals=n)
                maps = work / f"maps_{n}_{round_}"
                start = time.perf_counter()
                summaries = map_scenes(model, scenes, maps, tiling, device, progress=False)
                seconds[n].append(time.perf_counter() - start)
                scores[n] = pooled_scores(summaries, scenes, maps, args.iou)
                shutil.rmtree(maps)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first = scores[None]
    print(f"checkpoint {args.ckpt}; device {device}; {first['tiles']} tiles of {model.tile_size} px; "
          f"{first['true']} true slumps; score >= {args.score_threshold}; IoU >= {args.iou}; "
          f"median of {args.repeats} rounds; precision, recall and F1 in %")
    print(f"{'proposals per tile':<26} {'tiles/s':>8} {'speed':>6} {'mapped':>7} {'precision':>9} {'recall':>7} {'F1':>6}")
    base = statistics.median(seconds[None])
    for n in settings:
        median = statistics.median(seconds[n])
        s = scores[n]
        label = f"{own} (checkpoint's)" if n is None else str(n)
        print(f"{label:<26} {s['tiles'] / median:>8.2f} {base / median:>5.2f}x {s['mapped']:>7d} "
              f"{s['precision']:>9.1f} {s['recall']:>7.1f} {s['f1']:>6.1f}")


if __name__ == "__main__":
    main()
