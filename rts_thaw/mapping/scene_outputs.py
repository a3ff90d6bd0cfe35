"""Per-scene output files: names, atomic writing, and knowing which scenes are done.

A scene is done when its GeoPackage exists; it is renamed into place last, after any
GeoJSON and score raster, so a run killed part-way leaves the scene not done (and
only hidden temporary files, which the rerun removes) rather than half-written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rts_thaw.mapping.instances import SceneInstance
from rts_thaw.core.vectors import VectorLayer, remove_if_empty, write_layer
from rts_thaw.core.vectors import area_m2
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


def scene_layer(instances: list[SceneInstance], transform, crs, scene_id: str, model: str, ckpt: str) -> VectorLayer:
    polygons = instance_polygons(instances, transform)
    n = len(polygons)
    crs = crs.to_wkt() if hasattr(crs, "to_wkt") else crs
    return VectorLayer(
        polygons,
        crs,
        {
            "scene_id": np.array([scene_id] * n, dtype=object),
            "score": np.array([inst.score for inst in instances], dtype=np.float64),
            "area_m2": np.array([area_m2(p, crs) for p in polygons], dtype=np.float64),
            "pixels": np.array([inst.pixels for inst in instances], dtype=np.int64),
            "n_tiles": np.array([inst.n_tiles for inst in instances], dtype=np.int64),
            "modalities": np.array([",".join(inst.modalities) for inst in instances], dtype=object),
            "model": np.array([model] * n, dtype=object),
            "ckpt": np.array([ckpt] * n, dtype=object),
        },
    )


def write_scene(layer: VectorLayer, outputs: SceneOutputs, geojson: bool) -> None:
    if geojson:
        write_layer(layer, outputs.geojson)
    write_layer(layer, outputs.gpkg)  # last: its existence marks the scene done
