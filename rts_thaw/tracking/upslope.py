"""The upslope direction at each slump from a DEM raster.

A plane fitted by least squares to the DEM around the slump (its bounding box grown by half its
size on every side, so the hillslope the headwall cuts into is in it; the slump's own pixels left
out, as the slump floor is carved below the slope) gives the gradient; its
direction, carried from the DEM's CRS into the site's metric CRS, is upslope. A slump the DEM
does not cover, or flat ground, has no direction (NaN): the growth direction is used there.
"""

from __future__ import annotations

import numpy as np
import pyproj
import rasterio
import shapely
from rasterio.errors import WindowError
from rasterio.features import geometry_mask
from rasterio.windows import Window, from_bounds
from rasterio.warp import transform_bounds

from rts_thaw.core.vectors import reproject

MIN_PIXELS = 6  # fewer valid DEM pixels than this cannot tell a slope


def _plane_gradient(values: np.ma.MaskedArray, transform) -> tuple[float, float] | None:
    """(dz/dx, dz/dy) in the DEM's CRS of a plane fitted to the valid pixels, or None."""
    rows, cols = np.nonzero(~np.ma.getmaskarray(values))
    if len(rows) < MIN_PIXELS:
        return None
    xs, ys = rasterio.transform.xy(transform, rows, cols)
    design = np.column_stack([np.asarray(xs) - np.mean(xs), np.asarray(ys) - np.mean(ys), np.ones(len(rows))])
    (gx, gy, _), *_ = np.linalg.lstsq(design, np.asarray(values[rows, cols], dtype=float), rcond=None)
    return (gx, gy) if np.hypot(gx, gy) > 0 else None


def upslope_directions(dem_path, geometries: np.ndarray, crs: pyproj.CRS) -> np.ndarray:
    """Unit vectors (n x 2, metric CRS) pointing upslope at each polygon; NaN where the DEM cannot tell."""
    directions = np.full((len(geometries), 2), np.nan)
    with rasterio.open(dem_path) as dem:
        to_dem = pyproj.Transformer.from_crs(crs, dem.crs, always_xy=True)
        from_dem = pyproj.Transformer.from_crs(dem.crs, crs, always_xy=True)
        full = Window(0, 0, dem.width, dem.height)
        outlines = reproject(list(geometries), crs.to_wkt(), dem.crs.to_wkt())
        for k, (x0, y0, x1, y1) in enumerate(shapely.bounds(geometries)):
            pad = max(x1 - x0, y1 - y0) / 2
            bounds = transform_bounds(crs, dem.crs, x0 - pad, y0 - pad, x1 + pad, y1 + pad)
            try:
                window = from_bounds(*bounds, transform=dem.transform).round_offsets().round_lengths()
                window = window.intersection(full)
            except WindowError:  # the slump lies outside the DEM
                continue
            values = dem.read(1, window=window, masked=True)
            transform = dem.window_transform(window)
            inside = geometry_mask([outlines[k]], values.shape, transform, invert=True, all_touched=True)
            around = np.ma.masked_where(inside, values)
            gradient = _plane_gradient(around, transform) or _plane_gradient(values, transform)
            if gradient is None:
                continue
            cx, cy = to_dem.transform((x0 + x1) / 2, (y0 + y1) / 2)
            step = abs(dem.transform.a)  # one DEM pixel along the gradient
            norm = np.hypot(*gradient)
            ex, ey = from_dem.transform(cx + step * gradient[0] / norm, cy + step * gradient[1] / norm)
            sx, sy = from_dem.transform(cx, cy)
            vector = np.array([ex - sx, ey - sy])
            directions[k] = vector / np.hypot(*vector)
    return directions
