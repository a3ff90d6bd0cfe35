"""Whole-scene prediction throughput vs the model's forward pass alone, on the same tiles, in one run.

Pipeline: `rts_thaw.mapping.map_scenes` end to end (read tiles with DataLoader workers ->
normalise -> infer -> masks to the host -> paste into tiles -> merge across seams ->
vectorise -> write GeoPackage). Forward only: the same tiles, read and normalised
beforehand and held in memory, batched identically, through the same detector, called as
the pipeline calls it (`paste_masks=False`: pasting is pipeline work, done by the writers). The ratio says how much of the
model's speed the mapping machinery keeps (target on a GPU: >= 90%).

    python benchmarks/bench_predict.py                       # synthetic world, random-init micro cascade
    python benchmarks/bench_predict.py --ckpt run/best.ckpt --device cuda --tile-size 256 --batch-size 16
    python benchmarks/bench_predict.py --encoder mvitv2_tiny --heads cascade --tile-size 256 --device cuda

Without --ckpt the detector has random weights: by default the CPU model (micro MViTv2
cascade), or the paper's scale with `--encoder mvitv2_tiny --heads cascade`. Its heads are
told to keep --max-detections detections per tile at any score, so merging and vectorising
get real work (a trained model on real scenes keeps far fewer). `--world DIR` keeps the
generated world in DIR and reuses it on the next run (large scenes take a minute each to draw).
`--repeat N` lists every scene N times (under distinct ids, same rasters), so that a long run's
steady state outweighs the pipeline's start-up and its last scene's finishing, as in a large
mapping run; the forward-only row then runs the same tiles N times too.
`--rounds R` runs the forward-only pass and the pipeline R times, alternating, and compares
their totals: on the H200 the forward rate alone varied from 72.6 to 85.4 tiles/s between
runs of the same command, so one pass of each can put a drift of the device into the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from rts_thaw.data.geotiff import SceneReader, load_scene_list
from rts_thaw.data.normalization import NormStats
from rts_thaw.data.synthetic import WorldParams, generate_world
from rts_thaw.mapping.map_scenes import LoadedModel, load_model, map_scenes, resolve_device, set_detection_limits
from rts_thaw.mapping.engine import PRECISIONS, TilingConfig, inference_autocast
from rts_thaw.mapping.tile_sources import SceneTiles, collate_tiles
from rts_thaw.models.speed import apply_speed

MODALITIES = ["rgb", "ndvi", "nir"]


def random_model(tile_size: int, modalities: list[str], channels: dict[str, int], encoder: str,
                 heads: str) -> LoadedModel:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose(None, overrides=["+model=cascade_mvit", f"model/encoder={encoder}", f"model/heads={heads}",
                                       "model/fusion=residual_cross_attention", f"+data.tile_size={tile_size}"])
    torch.manual_seed(0)  # the same random detector, so runs are comparable
    detector = instantiate(cfg.model)(modality_channels={m: channels[m] for m in modalities})
    # statistics of the synthetic world's bands, roughly: inputs of the right scale
    stats = NormStats({"rgb": [120.0] * 3, "ndvi": [0.4], "nir": [2500.0]}, {"rgb": [40.0] * 3, "ndvi": [0.2], "nir": [800.0]})
    return LoadedModel(detector, stats.subset(modalities), tile_size, f"random_{encoder}_{heads}", "none")


def in_memory_batches(scenes, model: LoadedModel, tiling: TilingConfig) -> list[dict]:
    """The pipeline's tiles, read, normalised and batched the same way, held in memory."""
    shapes = []
    for spec in scenes:
        with SceneReader(spec, list(model.detector.modalities)) as reader:
            shapes.append((reader.height, reader.width))
    dataset = SceneTiles(scenes, shapes, tiling.tile_size, tiling.stride, list(model.detector.modalities),
                         model.norm_stats)
    items = [dataset[i] for i in range(len(dataset))]
    batches = [collate_tiles(items[i:i + tiling.batch_size]) for i in range(0, len(items), tiling.batch_size)]
    return [b for b in batches if b["group"]]


def repeated_scene_list(scene_list: Path, repeat: int, work: Path) -> Path:
    """The scene list with every scene listed `repeat` times under distinct ids (same rasters)."""
    doc = yaml.safe_load(scene_list.read_text())
    entries = []
    for k in range(repeat):
        for entry in doc["scenes"]:
            rasters = {m: str(scene_list.parent / path) for m, path in entry["rasters"].items()}
            entries.append({**entry, "id": f"{entry['id']}_r{k}", "rasters": rasters, "labels": None})
    path = work / "scenes_repeated.yaml"
    path.write_text(yaml.safe_dump({"scenes": entries}))
    return path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_only(model: LoadedModel, batches: list[dict], device: torch.device, precision: str) -> float:
    autocast = inference_autocast(device, precision)
    start = time.perf_counter()
    for batch in batches:
        images = {m: x.to(device, non_blocking=True) for m, x in batch["image"].items()}
        with autocast:
            model.detector(images, batch["image_sizes"], paste_masks=False)  # as the pipeline calls it
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a training checkpoint (default: a random-init cascade)")
    parser.add_argument("--encoder", default="mvitv2_micro", help="conf/model/encoder option of the random model")
    parser.add_argument("--heads", default="cascade_light", help="conf/model/heads option of the random model")
    parser.add_argument("--world", help="generate the world here once and reuse it (default: a temporary folder)")
    parser.add_argument("--scenes", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="scene side in 4 m pixels")
    parser.add_argument("--repeat", type=int, default=1, help="list every scene this many times (see above)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate forward-only and pipeline passes (see above)")
    parser.add_argument("--tile-size", type=int, help="default: the checkpoint's, or 128 for a random model")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write-workers", type=int,
                        help="processes finishing scenes (0: a thread; default: by device, as tiling.write_workers)")
    parser.add_argument("--max-detections", type=int, default=20)
    parser.add_argument("--proposals", type=int, help="RPN proposals per tile (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="32", help="both rows use it")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--channels-last", action="store_true", help="both rows: predict's speed.channels_last")
    parser.add_argument("--compile", default="", help="both rows: predict's speed.compile, comma-separated parts "
                        "(rts_thaw.models.speed.COMPILABLE_PARTS); the warm-up pass compiles them")
    parser.add_argument("--compile-mode", help="torch.compile's mode (default: its own)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: list every scene at least once")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: run at least one round")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        params = WorldParams(scenes=args.scenes, size=args.size, seed=11)
        world = Path(args.world) / f"synthetic_{params.key()}" if args.world else work / "world"
        scene_list = world / "scenes.yaml"
        if not scene_list.exists():
            scene_list = generate_world(world, params, workers=os.cpu_count() or 1)
        scenes = load_scene_list(scene_list)
        log(f"world ready: {len(scenes)} scenes")
        if args.ckpt:
            model = load_model(args.ckpt, device)
            args.tile_size = args.tile_size or model.tile_size
        else:
            args.tile_size = args.tile_size or 128
            with SceneReader(scenes[0], MODALITIES) as reader:
                channels = dict(reader.channels)
            model = random_model(args.tile_size, MODALITIES, channels, args.encoder, args.heads)
            model.detector.to(device).eval()
        apply_speed(model.detector, args.channels_last, [p for p in args.compile.split(",") if p],
                    {"mode": args.compile_mode} if args.compile_mode else {})
        score_threshold = 0.0 if not args.ckpt else 0.3
        tiling = TilingConfig(tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                              num_workers=args.workers, write_workers=args.write_workers,
                              score_threshold=score_threshold, max_detections=args.max_detections,
                              proposals=args.proposals)
        set_detection_limits(model.detector, tiling.score_threshold, tiling.max_detections, tiling.proposals)

        batches = in_memory_batches(scenes, model, tiling)
        log(f"read {len(batches)} batches into memory")
        n_tiles = args.rounds * args.repeat * sum(len(b["group"]) for b in batches)  # over all rounds
        start = time.perf_counter()
        forward_only(model, batches[:2], device, args.precision)  # warm-up (allocator, cuDNN autotune, compiling)
        log(f"warm-up {time.perf_counter() - start:.1f} s")
        mapped = repeated_scene_list(scene_list, args.repeat, work) if args.repeat > 1 else scene_list
        rounds, stages = [], {}
        for r in range(args.rounds):
            t_forward = forward_only(model, batches * args.repeat, device, args.precision)
            log(f"round {r + 1}: forward only {t_forward:.2f} s")
            start = time.perf_counter()
            # a fresh output folder each round: scenes already done would be skipped
            summaries = map_scenes(model, mapped, work / f"out{r}", tiling, device, progress=False,
                                   precision=args.precision)
            sync(device)
            rounds.append((t_forward, time.perf_counter() - start))
            log(f"round {r + 1}: pipeline {rounds[-1][1]:.2f} s")
            for summary in summaries:
                for stage, seconds in summary["seconds"].items():
                    stages[stage] = stages.get(stage, 0.0) + seconds
        t_forward, t_pipeline = (sum(times) for times in zip(*rounds))
        km2 = args.rounds * sum(s["km2"] for s in summaries)
        instances = sum(s["instances"] for s in summaries)
        raw = sum(s["raw_instances"] for s in summaries)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; precision {args.precision}; channels_last {args.channels_last}; "
          f"compile [{args.compile}]{' mode ' + args.compile_mode if args.compile_mode else ''}")
    listed = f" (each listed {args.repeat} times)" if args.repeat > 1 else ""
    rounds_note = f"; {args.rounds} rounds, totals" if args.rounds > 1 else ""
    print(f"{args.scenes} scenes{listed} of {args.size} px (4 m){rounds_note} = {km2:.2f} km2; {n_tiles} tiles of {args.tile_size} px, "
          f"overlap {args.overlap}, batch {args.batch_size}, {args.workers} reading / {tiling.writer_count(device)} writing workers; "
          f"{raw} tile detections merged into {instances} slumps{' per round' if args.rounds > 1 else ''}")
    rows = [("forward only (tiles in memory)", t_forward), ("pipeline read->infer->merge->write", t_pipeline)]
    print(f"{'':38s} {'seconds':>8s} {'tiles/s':>8s} {'km2/h':>10s}")
    for label, seconds in rows:
        print(f"{label:38s} {seconds:8.2f} {n_tiles / seconds:8.2f} {km2 / seconds * 3600:10.1f}")
    ratio = t_forward / t_pipeline
    print(f"pipeline / forward-only throughput: {100 * ratio:.1f}%")
    if args.rounds > 1:
        print("by round (forward s, pipeline s, ratio): " + "; ".join(
            f"{f:.2f}, {p:.2f}, {100 * f / p:.1f}%" for f, p in rounds))
    print(f"device-hours per million km2 at this tile size: {1e6 / (km2 / t_pipeline * 3600):.1f}")
    print("pipeline stages (s; merge and write overlap the next scene's inference): "
          + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    n_batches = args.rounds * args.repeat * len(batches)
    print(f"inference inside the pipeline {stages['infer']:.2f} s against {t_forward:.2f} s alone: "
          f"{1000 * (stages['infer'] - t_forward) / n_batches:+.1f} ms per batch of {n_batches}")
    loop = stages["wait_for_tiles"] + stages["infer"]
    print(f"the model's loop (waiting for tiles + inference) {loop:.2f} s of the pipeline's {t_pipeline:.2f} s; "
          f"outside it (start-up, finishing the scenes still being written at its end) {t_pipeline - loop:.2f} s; "
          f"the first scene{' of the last round' if args.rounds > 1 else ''} waited "
          f"{summaries[0]['seconds']['wait_for_tiles']:.2f} s for its tiles (the reading workers' start)")


if __name__ == "__main__":
    main()
