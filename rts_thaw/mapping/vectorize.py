"""Instance masks to polygons in the scene's CRS (rasterio.features.shapes)."""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from rasterio.features import shapes

from rts_thaw.mapping.instances import SceneInstance


def instance_polygons(instances: list[SceneInstance], transform: Affine) -> list[shapely.MultiPolygon]:
    """The outline of each slump, holes kept, as one MultiPolygon per instance (one slump = one feature)."""
    if not instances:
        return []
    rings, ring_polygon, polygon_instance = [], [], []
    for k, instance in enumerate(instances):
        local = transform @ Affine.translation(instance.col, instance.row)
        # shapes() traces each 4-connected region once, holes included; regions never overlap
        # (at most they touch at a corner), so together they are already a valid MultiPolygon
        for geom, _ in shapes(instance.mask.astype("uint8"), mask=instance.mask, transform=local):
            for ring in geom["coordinates"]:  # the shell first, then the holes
                rings.append(ring)
                ring_polygon.append(len(polygon_instance))
            polygon_instance.append(k)
    # three vectorised calls: making one shapely object per region in Python cost more than the tracing
    coords = np.concatenate([np.asarray(ring, dtype=np.float64) for ring in rings])
    ring_of_coord = np.repeat(np.arange(len(rings)), [len(ring) for ring in rings])
    polygons = shapely.polygons(shapely.linearrings(coords, indices=ring_of_coord), indices=ring_polygon)
    return list(shapely.multipolygons(polygons, indices=polygon_instance))
