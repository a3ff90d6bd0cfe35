"""Splitting a scene list across jobs, and merging the jobs' per-scene layers into one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyproj

from rts_thaw.core.vectors import VectorLayer, read_layer, reproject, write_layer

# Scenes in different UTM zones share no CRS; NSIDC polar stereographic north suits the Arctic.
ARCTIC_CRS = "EPSG:3413"


def shard_scenes(scenes: list, shard: int, num_shards: int) -> list:
    """Every num_shards-th scene in id order, starting at `shard`: shards are disjoint and cover all."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} num_shards={num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    ordered = sorted(scenes, key=lambda s: s.id)
    return ordered[shard::num_shards]


def merge_scene_layers(paths: list[Path], output: Path, crs: str | None = None) -> Path:
    """One layer from many per-scene layers (any CRS); areas stay those measured per scene."""
    if not paths:
        raise FileNotFoundError(f"no per-scene layers to merge into {output}")
    layers = [read_layer(p) for p in sorted(paths)]
    if crs is None:
        crss = {pyproj.CRS(layer.crs).to_wkt() for layer in layers}
        crs = crss.pop() if len(crss) == 1 else pyproj.CRS(ARCTIC_CRS).to_wkt()
    names = list(layers[0].columns)
    for path, layer in zip(sorted(paths), layers):
        if list(layer.columns) != names:
            raise ValueError(f"{path}: columns {list(layer.columns)} differ from {names}")
    geometries = [g for layer in layers for g in reproject(layer.geometries, layer.crs, crs)]
    columns = {n: np.concatenate([layer.columns[n] for layer in layers]) for n in names}
    return write_layer(VectorLayer(geometries, pyproj.CRS(crs).to_wkt(), columns), output)
