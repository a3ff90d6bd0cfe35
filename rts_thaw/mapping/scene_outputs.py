"""Per-scene output files: names, the formats (GeoPackage, and GeoJSON and a score COG on
request), atomic writing, and knowing which scenes are done.

A scene is done when its GeoPackage exists; it is renamed into place last, after any
GeoJSON and score raster, so a run killed part-way leaves the scene not done (and
only hidden temporary files, which the rerun removes) rather than half-written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from rts_thaw.core.vectors import VectorLayer, area_m2, remove_if_empty, write_layer
from rts_thaw.mapping.instances import SceneInstance, TileDetections
from rts_thaw.mapping.score_raster import ScoreRasterWriter
from rts_thaw.mapping.vectorize import instance_polygons


def checkpoint_identity(ckpt_path: str | Path) -> str:
    """File name and content hash of a checkpoint: which model drew a polygon."""
    digest = hashlib.sha256()
    with open(ckpt_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{Path(ckpt_path).name}:sha256:{digest.hexdigest()[:16]}"


@dataclass
class SceneOutputs:
    out_dir: Path
    scene_id: str

    @property
    def gpkg(self) -> Path:
        return self.out_dir / f"{self.scene_id}.gpkg"

    @property
    def geojson(self) -> Path:
        return self.out_dir / f"{self.scene_id}.geojson"

    @property
    def score_tif(self) -> Path:
        return self.out_dir / f"{self.scene_id}_score.tif"

    def done(self) -> bool:
        return self.gpkg.exists()

    def remove_leftovers(self) -> None:
        """This scene's files in the temporary folders of interrupted runs (other scenes'
        files there may belong to a shard still running, so they stay)."""
        for folder in self.out_dir.glob(".tmp-*"):
            for path in folder.glob(f"{self.scene_id}*"):
                if path.stem in (self.scene_id, f"{self.scene_id}_score", f"{self.scene_id}_score.draft"):
                    path.unlink()
            remove_if_empty(folder)


def scene_layer(instances: list[SceneInstance], transform, crs, scene_id: str, model: str, ckpt: str,
                date: str | None = None, site: str | None = None) -> VectorLayer:
    """The scene's slumps with their fields; `date` (ISO) and `site` are the scene's, empty
    when it has none, so that the polygons of one place can be followed through the years."""
    polygons = instance_polygons(instances, transform)
    n = len(polygons)
    crs = crs.to_wkt() if hasattr(crs, "to_wkt") else crs
    return VectorLayer(
        polygons,
        crs,
        {
            "scene_id": np.array([scene_id] * n, dtype=object),
            "date": np.array([date or ""] * n, dtype=object),
            "site": np.array([site or ""] * n, dtype=object),
            "score": np.array([inst.score for inst in instances], dtype=np.float64),
            "area_m2": np.array([area_m2(p, crs) for p in polygons], dtype=np.float64),
            "pixels": np.array([inst.pixels for inst in instances], dtype=np.int64),
            "n_tiles": np.array([inst.n_tiles for inst in instances], dtype=np.int64),
            "modalities": np.array([",".join(inst.modalities) for inst in instances], dtype=object),
            "model": np.array([model] * n, dtype=object),
            "ckpt": np.array([ckpt] * n, dtype=object),
        },
    )


@dataclass
class FinishedScene:
    """A scene after merging: what every output format is written from."""

    scene_id: str
    layer: VectorLayer  # one polygon per slump, with its fields
    instances: list[SceneInstance]  # the merged slumps on the scene grid
    tiles: list[TileDetections]  # every tile the model saw (where it looked)
    transform: Affine
    crs_wkt: str
    shape: tuple[int, int]  # (height, width)


def write_geojson(scene: FinishedScene, outputs: SceneOutputs) -> None:
    write_layer(scene.layer, outputs.geojson)


def write_score_raster(scene: FinishedScene, outputs: SceneOutputs) -> None:
    """The score COG, which also marks where the model looked (NaN elsewhere)."""
    height, width = scene.shape
    writer = ScoreRasterWriter(outputs.score_tif, width, height, scene.transform, scene.crs_wkt)
    try:
        for tile in scene.tiles:
            writer.mark_valid(tile.window, tile.valid_pixels())
        writer.add_instances(scene.instances)
    except BaseException:
        writer.abort()
        raise
    writer.close()


# Outputs written beside the GeoPackage when their switch in conf/predict.yaml is on. A new
# format (say GeoParquet) is one function like those above, one entry here and one switch there.
EXTRA_OUTPUTS = {"geojson": write_geojson, "score_raster": write_score_raster}


def write_scene(scene: FinishedScene, outputs: SceneOutputs, extra: Sequence[str] = ()) -> None:
    """The requested extra outputs, then the GeoPackage: its existence marks the scene done."""
    for name in extra:
        EXTRA_OUTPUTS[name](scene, outputs)
    write_layer(scene.layer, outputs.gpkg)
