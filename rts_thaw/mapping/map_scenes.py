"""Map a list of scenes with a checkpoint: one GeoPackage (and optional GeoJSON / score COG) per scene.

Scenes already done are skipped, leftovers of an interrupted run are removed, and
each scene's files appear only when complete, so a killed run resumes cleanly.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import shapely
import torch
from rasterio.transform import array_bounds

from rts_thaw.data.geotiff import SceneReader, SceneSpec, load_scene_list
from rts_thaw.data.normalization import NormStats
from rts_thaw.mapping.scene_outputs import SceneOutputs, checkpoint_identity, scene_layer, write_scene
from rts_thaw.mapping.scene_predictor import TilingConfig, predict_scenes
from rts_thaw.mapping.score_raster import ScoreRasterWriter
from rts_thaw.mapping.seam_merge import merge_across_seams
from rts_thaw.mapping.shards import shard_scenes
from rts_thaw.mapping.vectorize import area_m2


@dataclass
class LoadedModel:
    detector: torch.nn.Module
    norm_stats: NormStats
    tile_size: int
    name: str
    identity: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ckpt_path: str | Path, device: torch.device) -> LoadedModel:
    from rts_thaw.training.evaluation import detector_from_checkpoint, load_checkpoint

    checkpoint = load_checkpoint(ckpt_path)
    info = checkpoint["rts_thaw"]
    detector = detector_from_checkpoint(checkpoint).to(device).eval()
    config = info.get("config") or {}
    name = config.get("name") or type(detector).__name__
    return LoadedModel(detector, NormStats.from_dict(info["norm_stats"]), int(info["tile_size"]), str(name),
                       checkpoint_identity(ckpt_path))


def set_detection_limits(detector: torch.nn.Module, score_threshold: float, max_detections: int | None = None) -> None:
    """Make the heads keep exactly the detections that will be mapped (score >= threshold, at
    most `max_detections` per tile): masks are computed only for those, and the tiling config
    is the one place these are set."""
    heads = getattr(detector, "roi_heads", None)
    if heads is not None and hasattr(heads, "score_thresh"):
        heads.score_thresh = score_threshold
    if heads is not None and max_detections is not None and hasattr(heads, "detections_per_img"):
        heads.detections_per_img = max_detections


def check_modalities(scenes: list[SceneSpec], modalities: list[str], source: Path) -> None:
    """Every scene must have every modality the model reads: checked before any work."""
    lacking = {s.id: sorted(set(modalities) - set(s.rasters)) for s in scenes if set(modalities) - set(s.rasters)}
    if lacking:
        listed = "; ".join(f"{sid} lacks {missing}" for sid, missing in list(lacking.items())[:5])
        raise ValueError(f"{source}: the checkpoint reads modalities {modalities}, but {len(lacking)} scene(s) "
                         f"do not have them: {listed}")


def map_scenes(model: LoadedModel, scenes_path: str | Path, output_dir: str | Path, tiling: TilingConfig,
               device: torch.device, shard: int = 0, num_shards: int = 1, geojson: bool = False,
               score_raster: bool = False, progress: bool = True) -> list[dict]:
    """Predict every scene of this shard that is not done yet; returns one summary per scene.

    Merging, vectorising and writing a finished scene run in a background thread while
    the model goes on with the next scene's tiles.
    """
    scenes_path, output_dir = Path(scenes_path), Path(output_dir)
    scenes = shard_scenes(load_scene_list(scenes_path), shard, num_shards)
    check_modalities(scenes, list(model.detector.modalities), scenes_path)
    set_detection_limits(model.detector, tiling.score_threshold, tiling.max_detections)
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = {s.id: {"scene_id": s.id, "status": "skipped (done)"} for s in scenes}
    todo = [s for s in scenes if not SceneOutputs(output_dir, s.id).done()]
    grids = []
    for spec in todo:
        SceneOutputs(output_dir, spec.id).remove_leftovers()
        with SceneReader(spec, list(model.detector.modalities)) as reader:
            grids.append((reader.crs, reader.transform, (reader.height, reader.width)))
    writers: dict[int, ScoreRasterWriter] = {}  # opened at a scene's first tile, closed when it is written

    def writer(k: int) -> ScoreRasterWriter:
        if k not in writers:
            crs, transform, (height, width) = grids[k]
            writers[k] = ScoreRasterWriter(SceneOutputs(output_dir, todo[k].id).score_tif, width, height, transform, crs)
        return writers[k]

    index = {s.id: k for k, s in enumerate(todo)}
    started = time.perf_counter()

    def finish(spec, instances, stats) -> dict:
        k = index[spec.id]
        crs, transform, shape = grids[k]
        start = time.perf_counter()
        merged = merge_across_seams(instances, tiling.min_shared_iou)
        stats.seconds["merge"] = time.perf_counter() - start
        start = time.perf_counter()
        layer = scene_layer(merged, transform, crs, spec.id, model.name, model.identity)
        if score_raster:
            writer(k).add_instances(merged)
            writers.pop(k).close()
        write_scene(layer, SceneOutputs(output_dir, spec.id), geojson)
        stats.seconds["write"] = time.perf_counter() - start
        return {"scene_id": spec.id, "status": "done", "tiles": stats.tiles, "empty_tiles": stats.empty_tiles,
                "instances": len(merged), "raw_instances": stats.raw_instances,
                "seconds": {name: round(v, 3) for name, v in stats.seconds.items()},
                "km2": area_m2(shapely.box(*array_bounds(shape[0], shape[1], transform)), crs) / 1e6}

    futures = []
    with ThreadPoolExecutor(max_workers=1) as finisher:
        try:
            predict_scenes(model.detector, todo, [g[2] for g in grids], model.norm_stats, tiling, device,
                           on_scene_done=lambda spec, inst, stats: futures.append(finisher.submit(finish, spec, inst, stats)),
                           on_tile=(lambda k, window, valid: writer(k).mark_valid(window, valid)) if score_raster else None,
                           progress=progress)
        finally:
            # even when interrupted, scenes whose tiles all went through the model are written
            wait(futures)
            for unfinished in list(writers.values()):  # a scene that did not finish leaves no draft behind
                unfinished.abort()
    for future in futures:
        summary = future.result()
        summaries[summary["scene_id"]] = summary
    if todo and progress:
        print(f"mapped {len(todo)} scene(s) in {time.perf_counter() - started:.1f} s")
    return [summaries[s.id] for s in scenes]
