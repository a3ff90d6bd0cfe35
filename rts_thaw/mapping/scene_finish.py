"""Finishing one predicted scene: paste each tile's masks, merge across seams, vectorise, write
its outputs.

This is CPU work done while the model goes on with the next scenes, so on a GPU it runs
in separate processes (`tiling.write_workers`): in a thread of the inferring process it
would hold the interpreter lock against the loop that feeds the GPU, which on an H200
cut the whole pipeline to a quarter of the model's speed. Everything a job needs
travels in `SceneJob`, which pickles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import shapely
from affine import Affine
from rasterio.transform import array_bounds

from rts_thaw.core.vectors import area_m2
from rts_thaw.mapping.engine import GroupStats, TilingConfig
from rts_thaw.mapping.instances import TileDetections, tile_instances
from rts_thaw.mapping.scene_outputs import FinishedScene, SceneOutputs, scene_layer, write_scene
from rts_thaw.mapping.seam_merge import merge_across_seams


@dataclass
class SceneJob:
    scene_id: str
    tiles: list[TileDetections]  # every tile the model saw (all-nodata tiles never reached it)
    transform: Affine
    crs_wkt: str
    shape: tuple[int, int]  # (height, width)
    output_dir: Path
    model_name: str
    model_identity: str
    tiling: TilingConfig
    extra_outputs: tuple[str, ...] = ()  # beside the GeoPackage (scene_outputs.EXTRA_OUTPUTS)
    stats: GroupStats = field(default_factory=GroupStats)  # what inference already knows
    date: str | None = None  # the scene's acquisition date (ISO) and site, from the scene list
    site: str | None = None


def finish_scene(job: SceneJob) -> dict:
    """Write the scene's layers (the GeoPackage last: it marks the scene done); its summary."""
    outputs = SceneOutputs(job.output_dir, job.scene_id)
    seconds = {name: round(v, 3) for name, v in job.stats.seconds.items()}
    start = time.perf_counter()
    instances = [i for tile in job.tiles
                 for i in tile_instances(tile, job.tiling.mask_threshold, job.tiling.min_pixels)]
    seconds["paste"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    merged = merge_across_seams(instances, job.tiling.min_shared_iou)
    seconds["merge"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    layer = scene_layer(merged, job.transform, job.crs_wkt, job.scene_id, job.model_name, job.model_identity,
                        job.date, job.site)
    scene = FinishedScene(job.scene_id, layer, merged, job.tiles, job.transform, job.crs_wkt, job.shape)
    write_scene(scene, outputs, job.extra_outputs)
    seconds["write"] = round(time.perf_counter() - start, 3)
    bounds = shapely.box(*array_bounds(job.shape[0], job.shape[1], job.transform))
    return {"scene_id": job.scene_id, "status": "done", "tiles": job.stats.tiles, "empty_tiles": job.stats.empty_tiles,
            "raw_instances": len(instances), "instances": len(merged), "km2": area_m2(bounds, job.crs_wkt) / 1e6,
            "seconds": seconds}
