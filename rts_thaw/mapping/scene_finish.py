"""Finishing one predicted scene: merge tile instances across seams, vectorise, write.

This is CPU work done while the model goes on with the next scenes, so it runs in
separate processes (`tiling.write_workers`): in a thread of the inferring process it
would hold the interpreter lock against the loop that feeds the GPU, which on an H200
cut the whole pipeline to a quarter of the model's speed. Everything a job needs
travels in `SceneJob`, which pickles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from rasterio.transform import array_bounds

from rts_thaw.mapping.instances import SceneInstance
from rts_thaw.mapping.scene_outputs import SceneOutputs, scene_layer, write_scene
from rts_thaw.mapping.score_raster import ScoreRasterWriter
from rts_thaw.mapping.seam_merge import merge_across_seams
from rts_thaw.mapping.vectorize import area_m2


@dataclass
class SceneJob:
    scene_id: str
    instances: list[SceneInstance]
    transform: Affine
    crs_wkt: str
    shape: tuple[int, int]  # (height, width)
    output_dir: Path
    model_name: str
    model_identity: str
    min_shared_iou: float
    geojson: bool = False
    # (window, valid mask or None when every pixel is valid) of each tile read; set only when
    # a score raster is wanted, which marks where the model looked
    tiles_read: list[tuple[tuple[int, int, int, int], np.ndarray | None]] | None = None
    summary: dict = field(default_factory=dict)  # what inference already knows (tiles, seconds)


def finish_scene(job: SceneJob) -> dict:
    """Write the scene's layers (the GeoPackage last: it marks the scene done); its summary."""
    outputs = SceneOutputs(job.output_dir, job.scene_id)
    start = time.perf_counter()
    merged = merge_across_seams(job.instances, job.min_shared_iou)
    merge_seconds = time.perf_counter() - start
    start = time.perf_counter()
    layer = scene_layer(merged, job.transform, job.crs_wkt, job.scene_id, job.model_name, job.model_identity)
    if job.tiles_read is not None:
        height, width = job.shape
        writer = ScoreRasterWriter(outputs.score_tif, width, height, job.transform, job.crs_wkt)
        try:
            for window, valid in job.tiles_read:
                writer.mark_valid(window, np.ones(window[2:], bool) if valid is None else valid)
            writer.add_instances(merged)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    write_scene(layer, outputs, job.geojson)
    summary = dict(job.summary)
    summary["seconds"] = {**summary.get("seconds", {}), "merge": round(merge_seconds, 3),
                          "write": round(time.perf_counter() - start, 3)}
    bounds = shapely.box(*array_bounds(job.shape[0], job.shape[1], job.transform))
    return {**summary, "scene_id": job.scene_id, "status": "done", "instances": len(merged),
            "km2": area_m2(bounds, job.crs_wkt) / 1e6}
