"""A procedurally generated Arctic world: co-registered multimodal GeoTIFF scenes
with retrogressive thaw slump (RTS) polygons, deterministic from a seed.

Each scene is first drawn as vector objects (slumps and look-alike distractors) in a
UTM frame, painted onto a fine 2 m "truth" canvas, and then sampled onto each
modality's own grid, as real sensors would see the same ground:

- rgb:  3-band uint8, 4 m, UTM, nodata 0 (a strip-edge wedge in some scenes)
- nir:  1-band uint16 reflectance x 10000, 3 m on a shifted grid, nodata 0
- ndvi: 1-band float32, same 3 m grid as nir, NaN under clouds
- dem:  1-band float32 relative elevation (m), 2 m, polar stereographic EPSG:3413
        (ArcticDEM's CRS), nodata -9999
- rts.gpkg: one polygon per slump, in the scene CRS

Slumps are bare, low-NDVI, medium-NIR scars cut into slopes with a head scarp in the
DEM. Distractors (turbid water, gravel bars, burned tundra) often share the slump
shape. Three parameters set how much each sensor can tell on its own (`WorldParams`,
named presets in `WORLDS`):

- `rgb_separability` (0..1): how far each look-alike's colour moves from the slumps'
  bare-ground brown towards its own (dark turbid water, pale gravel, charred burns);
- `ndvi_separability` (0..1): likewise for their NDVI (1: each its own; 0: bare ground
  is bare ground to NDVI, whatever it is; NIR brightness still tells gravel from mud);
- `aux_resolution` (m): the NIR/NDVI pixel size (Sentinel-2: 10 m).

The *auxiliary-decisive* world (the default) has RGB separability 0: RGB alone is
ambiguous and NDVI/NIR decide. The *paper-like* world follows the paper's data, where
high-resolution RGB alone is the strongest input and 10 m NDVI/NIR resolve its confusions:
look-alikes mostly have their own colour, NDVI sees only "bare", NIR tells kinds of bare.

With `dates` > 1 the world evolves: each scene is a site, its ground, look-alikes and first
slumps drawn as a one-date scene's are, then written at every date (`<site>_<date>`) with
that date's slumps (`synthetic_evolution`: growth upslope, merges, splits, new slumps,
revegetation), illumination, clouds, noise and a co-registration error of a few metres.
Label files then carry a `slump_id`; the truth lies beside the scene list (lineage.csv,
growth.csv, coregistration.csv).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
import shapely
import yaml
from pyproj import Transformer
from rasterio.features import rasterize
from affine import Affine
from scipy import ndimage
from shapely.affinity import rotate, scale, translate
from shapely.geometry import LineString, Point, Polygon

from rts_thaw.core.lineage import iso_date
from rts_thaw.core.vectors import VectorLayer, write_layer
from rts_thaw.data import synthetic_evolution as evolution

GENERATOR_VERSION = 7  # bump when the output changes, so caches are not reused
UTM_CRS = "EPSG:32606"  # UTM zone 6N (northern Alaska)
DEM_CRS = "EPSG:3413"  # NSIDC polar stereographic north, the CRS of ArcticDEM
RGB_RES, NIR_RES, DEM_RES, TRUTH_RES = 4.0, 3.0, 2.0, 2.0
COREGISTRATION_M = 4.0  # an evolving world's later dates are misplaced by up to this, per axis
DEM_NODATA = -9999.0
MODALITIES = ("rgb", "nir", "ndvi", "dem")

# Ground classes and their spectral signature: (ndvi, nir reflectance, relative elevation m).
# RTS and its look-alikes share the "disturbed ground" RGB palette on purpose.
TUNDRA, WATER, GRAVEL, BURN, SNOW, RTS = range(6)
TUNDRA_RGB, TUNDRA_NDVI, TUNDRA_NIR = np.array([92.0, 104.0, 74.0]), 0.58, 0.31  # before its mottle
DISTURBED_RGB = np.array([138.0, 120.0, 100.0])
# Where each look-alike's colour goes as `rgb_separability` rises to 1: turbid water is
# darker and bluer, gravel paler and greyer, burns charred (as in sub-metre to 4 m RGB).
OWN_RGB = {WATER: np.array([78.0, 92.0, 104.0]), GRAVEL: np.array([178.0, 172.0, 160.0]),
           BURN: np.array([72.0, 62.0, 54.0])}
SIGNATURE = {
    WATER: (-0.30, 0.04, -1.0),
    GRAVEL: (0.04, 0.42, 0.0),
    BURN: (0.32, 0.13, 0.0),
    SNOW: (-0.03, 0.70, 0.3),
    RTS: (0.12, 0.24, 0.0),  # RTS elevation is shaped (scarp + floor), not a constant
}


# px per side: a slump (radius up to 85 m) is placed two radii from the edges, so a scene
# needs more than 2 x 170 m = 85 px of 4 m across
MIN_SCENE_SIZE = 96


@dataclass(frozen=True)
class WorldParams:
    """Everything that determines a generated world (and its cache key)."""

    scenes: int = 8
    size: int = 512  # RGB pixels per side
    seed: int = 0
    rts_per_scene: tuple[int, int] = (6, 10)
    distractors_per_scene: tuple[int, int] = (6, 10)
    rgb_separability: float = 0.0  # 0: look-alikes share the slumps' colour; 1: each has its own
    aux_resolution: float = 3.0  # NIR/NDVI pixel size, m (Sentinel-2: 10)
    ndvi_separability: float = 1.0  # 0: look-alikes share the slumps' NDVI; 1: each has its own
    # An evolving world (synthetic_evolution): each scene is a site seen at `dates` dates,
    # about `years_between` years apart from `first_date`. 1: one date, the world as before.
    dates: int = 1
    years_between: float = 2.0
    first_date: str = "2018-07-20"

    def __post_init__(self):
        for name in ("rgb_separability", "ndvi_separability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.aux_resolution < TRUTH_RES:
            raise ValueError(f"aux_resolution must be at least the truth grid's {TRUTH_RES} m, "
                             f"got {self.aux_resolution}")
        if self.size < MIN_SCENE_SIZE:  # slumps and look-alikes are placed with room around them
            raise ValueError(f"a synthetic scene needs at least {MIN_SCENE_SIZE} px per side, got size={self.size}")
        if self.scenes < 1:
            raise ValueError(f"a synthetic world needs at least 1 scene, got scenes={self.scenes}")
        if self.dates < 1:
            raise ValueError(f"a synthetic world needs at least 1 date, got dates={self.dates}")
        if self.years_between <= 0:
            raise ValueError(f"years_between must be positive, got {self.years_between}")
        if iso_date(self.first_date) != self.first_date:
            raise ValueError(f"first_date must be an ISO date (YYYY-MM-DD), got {self.first_date!r}")

    @classmethod
    def named(cls, world: str, **others) -> "WorldParams":
        if world not in WORLDS:
            raise ValueError(f"unknown synthetic world '{world}'; choose one of {sorted(WORLDS)}")
        return cls(**{**WORLDS[world], **others})

    def described(self) -> dict:
        """The parameters that shape the world: those of the evolution only where it has dates,
        so that one-date worlds keep the key (and cached copies) they had before it existed."""
        fields = asdict(self)
        if self.dates == 1:
            for name in EVOLUTION_FIELDS:
                del fields[name]
        return fields

    def key(self) -> str:
        blob = json.dumps({**self.described(), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


EVOLUTION_FIELDS = ("dates", "years_between", "first_date")


# The two worlds of the fusion table (docs/fusion.md). Set from what the sensors show, not
# from what a fusion needs: in the paper's data high-resolution RGB alone is the strongest
# input and 10 m NDVI/NIR resolve its confusions; the default world makes them decisive.
WORLDS = {
    "auxiliary_decisive": {"rgb_separability": 0.0, "aux_resolution": 3.0},
    "paper_like": {"rgb_separability": 0.8, "ndvi_separability": 0.0, "aux_resolution": 10.0},
}


# ----------------------------------------------------------------------------- shapes


def _slump_shape(rng: np.random.Generator, radius: float, downslope_deg: float) -> Polygon:
    """An amphitheatre / horseshoe footprint: a rounded head upslope, a tongue downslope."""
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 1 + sum(
        rng.uniform(0, 0.12) * np.cos(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    # The tongue is the half facing +x (downslope after rotation); stretch it.
    stretch = np.where(np.cos(angles) > 0, 1 + rng.uniform(0.2, 0.9) * np.cos(angles), 1.0)
    xs = radius * wobble * stretch * np.cos(angles)
    ys = radius * wobble * rng.uniform(0.7, 1.1) * np.sin(angles)
    shape = Polygon(np.column_stack([xs, ys])).buffer(0)
    if rng.random() < 0.45:  # horseshoe: an undisturbed remnant where the tongue leaves
        notch = scale(Point(0, 0).buffer(1.0), radius * 0.6, radius * 0.35)
        shape = shape.difference(translate(notch, radius * rng.uniform(0.9, 1.4), 0))
    shape = _largest_part(shape)
    return rotate(shape, downslope_deg, origin=(0, 0))


def _blob_shape(rng: np.random.Generator, radius: float) -> Polygon:
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    r = radius * (1 + sum(rng.uniform(0, 0.2) * np.cos(k * angles + rng.uniform(0, 7)) for k in (2, 3, 4)))
    shape = Polygon(np.column_stack([r * np.cos(angles), r * np.sin(angles) * rng.uniform(0.5, 1.0)]))
    return rotate(shape.buffer(0), rng.uniform(0, 180), origin=(0, 0))


def _river(rng: np.random.Generator, extent: float) -> Polygon:
    """A meandering channel crossing the scene."""
    t = np.linspace(-0.1, 1.1, 60) * extent
    phase, amp, wavelength = rng.uniform(0, 7), rng.uniform(40, 140), rng.uniform(300, 700)
    offset = rng.uniform(0.2, 0.8) * extent
    wander = np.cumsum(rng.normal(0, 12, t.size))  # so meanders are not a clean sine
    line = np.column_stack([t, offset + wander + amp * np.sin(2 * np.pi * t / wavelength + phase)])
    if rng.random() < 0.5:
        line = line[:, ::-1]
    return LineString(line).buffer(rng.uniform(8, 18))


def _largest_part(shape):
    if shape.geom_type == "MultiPolygon":
        return max(shape.geoms, key=lambda g: g.area)
    return shape


# ----------------------------------------------------------------------------- fields


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise with features about shape/cells pixels across."""
    coarse = rng.standard_normal((cells + 3, cells + 3))
    # Cubic up to a quarter size, then bilinear: smooth enough, and ten times faster.
    quarter = ndimage.zoom(coarse, (shape[0] / 4 / cells, shape[1] / 4 / cells), order=3)
    rows = np.linspace(0, quarter.shape[0] - 1, 4 * quarter.shape[0])[: shape[0]]
    cols = np.linspace(0, quarter.shape[1] - 1, 4 * quarter.shape[1])[: shape[1]]
    field = _bilinear_on_axes(quarter, rows, cols)
    return (field - field.mean()) / (field.std() + 1e-9)


def _bilinear_on_axes(field: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples at every (row, col) of two 1-D fractional pixel positions
    (clamped at the edges): what map_coordinates does for an axis-aligned grid, as
    separable gathers, several times faster."""
    rows = np.clip(rows, 0, field.shape[0] - 1)
    cols = np.clip(cols, 0, field.shape[1] - 1)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, field.shape[0] - 1), np.minimum(c0 + 1, field.shape[1] - 1)
    fr, fc = (rows - r0)[:, None], cols - c0
    along_cols = field[:, c0] * (1 - fc) + field[:, c1] * fc
    return along_cols[r0] * (1 - fr) + along_cols[r1] * fr


@dataclass
class _Object:
    kind: int
    geom: Polygon
    rgb: np.ndarray
    ndvi: float
    nir: float
    elev: float


class _Canvas:
    """The truth fields of one scene on a fine UTM grid, sampled by each sensor grid."""

    def __init__(self, x0: float, y0: float, n: int, rng: np.random.Generator):
        self.x0, self.y0, self.n = x0, y0, n
        self.transform = Affine(TRUTH_RES, 0.0, x0, 0.0, -TRUTH_RES, y0)
        shape = (n, n)
        mottle = _smooth_noise(rng, shape, 24)
        self.rgb = np.stack(
            [c + 14 * mottle + 6 * _smooth_noise(rng, shape, 90) for c in TUNDRA_RGB]
        )
        self.ndvi = TUNDRA_NDVI + 0.06 * mottle + 0.03 * _smooth_noise(rng, shape, 90)
        self.nir = TUNDRA_NIR + 0.03 * mottle
        self.elev = 6.0 * _smooth_noise(rng, shape, 4)  # relative elevation, metres
        slope_dir = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n] * TRUTH_RES
        self.elev += 0.02 * (np.cos(slope_dir) * xx + np.sin(slope_dir) * yy)
        self.elev -= self.elev.mean()
        self.cloud = np.zeros(shape, dtype=bool)
        self.shade = np.ones(shape)

    def downslope_deg(self, x: float, y: float) -> float:
        """Direction (map degrees, x east / y north) in which the ground falls."""
        row = int(np.clip((self.y0 - y) / TRUTH_RES, 1, self.n - 2))
        col = int(np.clip((x - self.x0) / TRUTH_RES, 1, self.n - 2))
        d_east = self.elev[row, col + 1] - self.elev[row, col - 1]
        d_north = self.elev[row - 1, col] - self.elev[row + 1, col]
        return math.degrees(math.atan2(-d_north, -d_east))

    def _window(self, geom, pad: int = 6):
        minx, miny, maxx, maxy = geom.bounds
        c0 = max(int((minx - self.x0) / TRUTH_RES) - pad, 0)
        c1 = min(int((maxx - self.x0) / TRUTH_RES) + pad + 1, self.n)
        r0 = max(int((self.y0 - maxy) / TRUTH_RES) - pad, 0)
        r1 = min(int((self.y0 - miny) / TRUTH_RES) + pad + 1, self.n)
        return r0, r1, c0, c1

    def _soft_mask(self, geom, window, blur: float) -> np.ndarray:
        r0, r1, c0, c1 = window
        transform = Affine(TRUTH_RES, 0.0, self.x0 + c0 * TRUTH_RES, 0.0, -TRUTH_RES, self.y0 - r0 * TRUTH_RES)
        hard = rasterize([geom], out_shape=(r1 - r0, c1 - c0), transform=transform).astype(float)
        return ndimage.gaussian_filter(hard, blur)  # vague boundaries

    def paint(self, obj: _Object, rng: np.random.Generator) -> None:
        window = self._window(obj.geom)
        r0, r1, c0, c1 = window
        if r1 <= r0 or c1 <= c0:
            return
        alpha = self._soft_mask(obj.geom, window, blur=0.8)
        texture = rng.standard_normal(alpha.shape)
        for band in range(3):
            target = obj.rgb[band] + 9 * texture
            self.rgb[band, r0:r1, c0:c1] += alpha * (target - self.rgb[band, r0:r1, c0:c1])
        self.ndvi[r0:r1, c0:c1] += alpha * (obj.ndvi + 0.03 * texture - self.ndvi[r0:r1, c0:c1])
        self.nir[r0:r1, c0:c1] += alpha * (obj.nir + 0.02 * texture - self.nir[r0:r1, c0:c1])
        if obj.kind == RTS:
            self._carve_slump(obj, window)
        elif obj.kind == WATER:  # a smooth surface a little below the ground around it
            ground = self.elev[r0:r1, c0:c1]
            level = ndimage.gaussian_filter(ground, 15.0, mode="nearest") + obj.elev
            self.elev[r0:r1, c0:c1] += alpha * (level - ground)
        else:
            self.elev[r0:r1, c0:c1] += alpha * obj.elev

    def _carve_slump(self, obj: _Object, window) -> None:
        """A floor sunk a few metres below the rim, deepest at the head scarp."""
        r0, r1, c0, c1 = window
        inside = self._soft_mask(obj.geom, window, blur=0.6)
        dist = ndimage.distance_transform_edt(inside > 0.5) * TRUTH_RES
        depth = obj.elev * np.clip(dist / 6.0, 0, 1)  # steep wall, then a floor
        self.elev[r0:r1, c0:c1] -= depth

    def add_cloud(self, geom, shadow_offset: tuple[float, float]) -> None:
        window = self._window(geom, pad=10)
        r0, r1, c0, c1 = window
        alpha = self._soft_mask(geom, window, blur=3.0)
        for band in range(3):
            self.rgb[band, r0:r1, c0:c1] += alpha * (235 - self.rgb[band, r0:r1, c0:c1])
        self.cloud[r0:r1, c0:c1] |= alpha > 0.3
        shadow = translate(geom, *shadow_offset)
        window = self._window(shadow, pad=10)
        r0, r1, c0, c1 = window
        if r1 > r0 and c1 > c0:
            self.shade[r0:r1, c0:c1] *= 1 - 0.45 * self._soft_mask(shadow, window, blur=3.0)

    def sample(self, field: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Bilinear samples of a truth field at UTM coordinates (NaN outside the canvas)."""
        rows = (self.y0 - ys) / TRUTH_RES - 0.5
        cols = (xs - self.x0) / TRUTH_RES - 0.5
        if np.ptp(rows, axis=1).max() == 0 and np.ptp(cols, axis=0).max() == 0:  # a north-up grid
            out = _bilinear_on_axes(field, rows[:, 0], cols[0])
        else:
            out = ndimage.map_coordinates(field, [rows, cols], order=1, mode="nearest")
        outside = (rows < -0.5) | (cols < -0.5) | (rows > self.n - 0.5) | (cols > self.n - 0.5)
        return np.where(outside, np.nan, out)


# ----------------------------------------------------------------------------- scene


def _place(rng, extent, margin, existing, geom_fn, tries=40, gap=4.0):
    """Place a shape at a random spot where it does not overlap earlier objects."""
    for _ in range(tries):
        x, y = rng.uniform(margin, extent - margin, size=2)
        geom = geom_fn(x, y)
        if all(not geom.intersects(other.buffer(gap)) for other in existing):
            return geom
    return None


def _draw_layout(rng: np.random.Generator, params: WorldParams, x0: float, y0: float):
    """The ground of one scene before anything is painted on it: its canvas, the slumps and the
    look-alikes (kind, shape), in the local frame (metres from the top-left corner, y down)."""
    extent = params.size * RGB_RES
    canvas = _Canvas(x0, y0, int(round(extent / TRUTH_RES)), rng)

    # Slumps first: on slopes, some in touching pairs, as slumps cluster along a valley.
    slumps: list[Polygon] = []
    for _ in range(rng.integers(*params.rts_per_scene, endpoint=True)):
        radius = math.exp(rng.uniform(math.log(15), math.log(85)))

        def make(x, y, radius=radius):
            # Local frame has y pointing down (rows), so a map angle is negated here.
            local = _slump_shape(rng, radius, -canvas.downslope_deg(x0 + x, y0 - y))
            return translate(local, x, y)

        geom = _place(rng, extent, radius * 2, slumps, make)
        if geom is None:
            continue
        slumps.append(geom)
        if rng.random() < 0.3:  # a neighbour sharing a boundary
            cx, cy = geom.centroid.x, geom.centroid.y
            angle = rng.uniform(0, 2 * np.pi)
            nx, ny = cx + 1.6 * radius * np.cos(angle), cy + 1.6 * radius * np.sin(angle)
            shape = _slump_shape(rng, radius * rng.uniform(0.6, 1.0), -canvas.downslope_deg(x0 + nx, y0 - ny))
            twin = translate(shape, nx, ny)
            for other in slumps:
                twin = twin.difference(other)  # they touch, never overlap: one pixel, one instance
            twin = _largest_part(twin)
            if not twin.is_empty and twin.area > 200 and shapely.box(0, 0, extent, extent).contains(twin):
                slumps.append(twin)

    # Distractors avoid slumps; half borrow the slump shape so shape is no giveaway.
    objects = [(WATER, _river(rng, extent))] if rng.random() < 0.6 else []
    if slumps and objects:
        keep_clear = shapely.union_all([s.buffer(6) for s in slumps])
        objects = [(kind, geom.difference(keep_clear)) for kind, geom in objects]
    taken = list(slumps) + [g for _, g in objects]
    for _ in range(rng.integers(*params.distractors_per_scene, endpoint=True)):
        kind = rng.choice([WATER, GRAVEL, BURN, GRAVEL, BURN, SNOW])
        radius = math.exp(rng.uniform(math.log(14), math.log(80 if kind != SNOW else 40)))
        slump_like = kind in (WATER, GRAVEL, BURN) and rng.random() < 0.5

        def make(x, y, radius=radius, slump_like=slump_like):
            local = _slump_shape(rng, radius, rng.uniform(0, 360)) if slump_like else _blob_shape(rng, radius)
            return translate(local, x, y)

        geom = _place(rng, extent, radius * 1.5, taken, make)
        if geom is not None:
            objects.append((kind, geom))
            taken.append(geom)
    return canvas, slumps, objects


def _local_to_utm(x0: float, y0: float):
    """The map from a scene's local frame (y down) to UTM."""
    return lambda g: translate(scale(g, 1, -1, origin=(0, 0)), x0, y0)


def _colour(rng: np.random.Generator, params: WorldParams, kind: int) -> np.ndarray:
    if kind == SNOW:
        return np.array([228.0, 233.0, 238.0]) + rng.normal(0, 5, 3)
    brightness = rng.uniform(0.85, 1.15)
    base = DISTURBED_RGB
    if kind in OWN_RGB:
        base = base + params.rgb_separability * (OWN_RGB[kind] - DISTURBED_RGB)
    return base * brightness + rng.normal(0, 10, 3)


def _signature(params: WorldParams, kind: int) -> tuple[float, float, float]:
    """(NDVI, NIR, elevation) of a look-alike: NDVI from the slumps' (0) to the kind's own (1)."""
    own_ndvi, own_nir, elev = SIGNATURE[kind]
    if kind == SNOW:
        return own_ndvi, own_nir, elev
    s = params.ndvi_separability
    return own_ndvi * s + SIGNATURE[RTS][0] * (1 - s), own_nir, elev


def _lookalikes(rng: np.random.Generator, params: WorldParams, objects, to_utm) -> list[_Object]:
    return [_Object(kind, to_utm(g), _colour(rng, params, kind), *_signature(params, kind))
            for kind, g in objects if not g.is_empty]


def _slump_look(rng: np.random.Generator, params: WorldParams, geom) -> _Object:
    ndvi, nir, _ = SIGNATURE[RTS]
    depth = rng.uniform(2.0, 5.0)  # metres below the rim
    return _Object(RTS, geom, _colour(rng, params, RTS), ndvi + rng.normal(0, 0.03), nir + rng.normal(0, 0.02), depth)


def _add_cloud(rng: np.random.Generator, canvas: _Canvas, extent: float, to_utm) -> None:
    if rng.random() < 0.5:  # a cloud (NaN in NDVI) and its shadow (darker RGB and NIR)
        cx, cy = rng.uniform(0.1, 0.9, size=2) * extent
        cloud = to_utm(translate(_blob_shape(rng, rng.uniform(40, 90)), cx, cy))
        canvas.add_cloud(cloud, (rng.uniform(-120, 120), rng.uniform(-120, 120)))


def _draw_scene(rng: np.random.Generator, params: WorldParams, x0: float, y0: float):
    canvas, slumps, objects = _draw_layout(rng, params, x0, y0)
    to_utm = _local_to_utm(x0, y0)
    painted = _lookalikes(rng, params, objects, to_utm) + [_slump_look(rng, params, to_utm(g)) for g in slumps]
    for obj in painted:
        canvas.paint(obj, rng)
    _add_cloud(rng, canvas, params.size * RGB_RES, to_utm)
    return canvas, [to_utm(g) for g in slumps]


def _relative_elevation(elev: np.ndarray, sigma: float) -> np.ndarray:
    """Elevation minus its smooth trend. The regional slope (a plane) is removed
    first, so the smoothing does not bend it at the scene edges."""
    rows, cols = np.mgrid[0 : elev.shape[0] : 8, 0 : elev.shape[1] : 8]  # a plane needs few samples
    design = np.column_stack([rows.ravel(), cols.ravel(), np.ones(rows.size)])
    a, b, c = np.linalg.lstsq(design, elev[::8, ::8].ravel(), rcond=None)[0]
    residual = elev - (a * np.arange(elev.shape[0])[:, None] + b * np.arange(elev.shape[1])[None, :] + c)
    return residual - ndimage.gaussian_filter(residual, sigma, mode="nearest")


def _grid_coords(transform, width, height):
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    t = transform
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def _transform_smooth(transformer: Transformer, xs: np.ndarray, ys: np.ndarray, step: int = 16):
    """Reproject a dense grid of points by projecting every `step`-th one and
    interpolating: over a few km a map projection is smooth to well under a millimetre."""
    rows = np.arange(0, xs.shape[0] + step - 1, step).clip(max=xs.shape[0] - 1)
    cols = np.arange(0, xs.shape[1] + step - 1, step).clip(max=xs.shape[1] - 1)
    px, py = transformer.transform(xs[np.ix_(rows, cols)], ys[np.ix_(rows, cols)])
    r = np.interp(np.arange(xs.shape[0]), rows, np.arange(len(rows)))
    c = np.interp(np.arange(xs.shape[1]), cols, np.arange(len(cols)))
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return (ndimage.map_coordinates(np.asarray(px), [rr, cc], order=1),
            ndimage.map_coordinates(np.asarray(py), [rr, cc], order=1))


def _write(path: Path, data: np.ndarray, crs: str, transform, nodata, dtype) -> None:
    profile = dict(
        driver="GTiff", width=data.shape[-1], height=data.shape[-2], count=data.shape[0],
        dtype=dtype, crs=crs, transform=transform, nodata=nodata,
        tiled=True, blockxsize=128, blockysize=128, compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(dtype))


def write_labels(path: Path, polygons: list, crs: str, slump_ids: list[int] | None = None) -> None:
    """Write RTS polygons as a GeoPackage layer (an empty list gives a valid empty layer);
    `slump_ids`, where given (an evolving world), become the `slump_id` column."""
    columns = {"rts_id": np.arange(1, len(polygons) + 1, dtype=np.int32),
               "area_m2": np.array([p.area for p in polygons], dtype=np.float64)}
    if slump_ids is not None:
        columns["slump_id"] = np.asarray(slump_ids, dtype=np.int64)
    write_layer(VectorLayer(list(polygons), crs, columns), path)


def _scene_origin(index: int) -> tuple[float, float]:
    """UTM top-left corner of scene (or site) `index`: scenes never overlap."""
    return 420000.0 + 6000.0 * index, 7740000.0 - 3000.0 * (index % 3)


@dataclass(frozen=True)
class Light:
    """One acquisition's illumination and season: gains on RGB and NIR, an offset on NDVI."""

    rgb_gain: tuple[float, float, float]
    nir_gain: float
    ndvi_offset: float


def _entry(scene_id: str, split: str, **more) -> dict:
    return {"id": scene_id, "split": split, **more, "rasters": {m: f"{scene_id}/{m}.tif" for m in MODALITIES},
            "labels": f"{scene_id}/rts.gpkg"}


def _generate_scene(out: Path, params: WorldParams, index: int) -> dict:
    """Scene `index` of a one-date world, in its folder; its scene-list entry."""
    scene_id = f"scene_{index:03d}"
    rng = np.random.default_rng([params.seed, index])
    x0, y0 = _scene_origin(index)
    canvas, slumps = _draw_scene(rng, params, x0, y0)
    (out / scene_id).mkdir(parents=True)
    write_sensors(out / scene_id, canvas, params, rng, wedge=index % 2 == 1)
    write_labels(out / scene_id / "rts.gpkg", slumps, UTM_CRS)
    return {"scenes": [_entry(scene_id, split_of(index, params.scenes))]}


def _generate_site(out: Path, params: WorldParams, index: int) -> dict:
    """Site `index` of an evolving world: its ground and look-alikes drawn once, as a one-date
    scene's are, its slumps evolved (`synthetic_evolution`), then a scene folder per date, each
    with its own illumination, clouds, noise and co-registration error. Returns the scene-list
    entries and the site's truth rows."""
    rng = np.random.default_rng([params.seed, index])
    x0, y0 = _scene_origin(index)
    extent = params.size * RGB_RES
    canvas, shapes, objects = _draw_layout(rng, params, x0, y0)
    to_utm = _local_to_utm(x0, y0)
    lookalikes = _lookalikes(rng, params, objects, to_utm)
    looks = [_slump_look(rng, params, None) for _ in shapes]

    def upslope(geom) -> tuple[float, float]:  # unit vector in the local frame (y down)
        angle = math.radians(canvas.downslope_deg(x0 + geom.centroid.x, y0 - geom.centroid.y))
        return -math.cos(angle), math.sin(angle)

    def new_slump(rng, taken):  # small, where a slump of the first date could be
        radius = math.exp(rng.uniform(math.log(10), math.log(30)))

        def make(x, y):
            return translate(_slump_shape(rng, radius, -canvas.downslope_deg(x0 + x, y0 - y)), x, y)

        geom = _place(rng, extent, radius * 2, taken, make)
        return None if geom is None else (geom, upslope(geom), _slump_look(rng, params, None))

    evolving = np.random.default_rng([params.seed, index, 0])
    site = f"site_{index:03d}"
    dates = evolution.acquisition_dates(evolving, params.first_date, params.years_between, params.dates)
    initial = [evolution.initial_slump(evolving, g, upslope(g), look) for g, look in zip(shapes, looks)]
    history = evolution.evolve_site(evolving, site, index, dates, initial, extent, new_slump, [g for _, g in objects])

    entries, shifts = [], []
    for d, (date, slumps) in enumerate(zip(history.dates, history.slumps)):
        scene_id, acquisition = f"{site}_{date}", np.random.default_rng([params.seed, index, d + 1])
        scene = copy.deepcopy(canvas)
        for obj in lookalikes + [_recovered(replace(s.look, geom=to_utm(s.geom)), s.recovery) for s in slumps]:
            scene.paint(obj, acquisition)
        _add_cloud(acquisition, scene, extent, to_utm)
        shift = (0.0, 0.0) if d == 0 else tuple(round(float(v), 3) for v in  # to the mm, as recorded
                                                acquisition.uniform(-COREGISTRATION_M, COREGISTRATION_M, 2))
        brightness = acquisition.normal(1.0, 0.04)
        light = Light(tuple(float(v) for v in brightness * acquisition.normal(1.0, 0.015, 3)),
                      float(brightness * acquisition.normal(1.0, 0.02)), float(acquisition.normal(0.0, 0.02)))
        (out / scene_id).mkdir(parents=True)
        write_sensors(out / scene_id, scene, params, acquisition, wedge=index % 2 == 1, shift=shift, light=light)
        write_labels(out / scene_id / "rts.gpkg", [translate(to_utm(s.geom), *shift) for s in slumps], UTM_CRS,
                     [s.id for s in slumps])
        entries.append(_entry(scene_id, split_of(index, params.scenes), date=date, site=site))
        shifts.append({"site": site, "date": date, "scene_id": scene_id, "shift_x_m": shift[0], "shift_y_m": shift[1]})
    return {"scenes": entries, "lineage": history.lineage, "growth": history.growth, "coregistration": shifts}


def _recovered(look: _Object, recovery: float) -> _Object:
    """A slump's look once its floor has revegetated by `recovery` (0..1) towards the tundra's."""
    if recovery == 0.0:
        return look
    return replace(look, rgb=look.rgb + recovery * (TUNDRA_RGB - look.rgb),
                   ndvi=look.ndvi + recovery * (TUNDRA_NDVI - look.ndvi), nir=look.nir + recovery * (TUNDRA_NIR - look.nir))


def write_sensors(scene_dir: Path, canvas: _Canvas, params: WorldParams, rng: np.random.Generator, wedge: bool,
                  shift: tuple[float, float] = (0.0, 0.0), light: Light | None = None) -> None:
    """Every modality's GeoTIFF of a painted canvas. `shift` (UTM metres) is a co-registration
    error: each grid shows the ground that lies `shift` away from where its transform puts it."""
    x0, y0, extent = canvas.x0, canvas.y0, params.size * RGB_RES

    # RGB, the reference grid; a strip-edge wedge of nodata in some scenes.
    rgb_tf = Affine(RGB_RES, 0.0, x0, 0.0, -RGB_RES, y0)
    xs, ys = _grid_coords(rgb_tf, params.size, params.size)
    shade = canvas.sample(canvas.shade, xs, ys)
    rgb = np.stack([canvas.sample(canvas.rgb[b], xs, ys) * shade for b in range(3)])
    if light is not None:
        rgb *= np.asarray(light.rgb_gain)[:, None, None]
    rgb += rng.normal(0, 3, rgb.shape)
    rgb = np.clip(np.round(rgb), 1, 255)
    if wedge:
        cols, rows = np.meshgrid(np.arange(params.size), np.arange(params.size))
        rgb[:, cols + rows < params.size * rng.uniform(0.15, 0.3)] = 0
    _write(scene_dir / "rgb.tif", rgb, UTM_CRS, Affine.translation(*shift) @ rgb_tf, 0, "uint8")

    # NIR and NDVI on their own grid (3 m by default) shifted off the RGB one, as a second
    # sensor's would be.
    aux_res = params.aux_resolution
    nir_tf = Affine(aux_res, 0.0, x0 - 7.3, 0.0, -aux_res, y0 + 5.1)
    n_nir = int(math.ceil((extent + 12) / aux_res))
    xs, ys = _grid_coords(nir_tf, n_nir, n_nir)

    def seen(field):
        if aux_res > NIR_RES:  # a pixel much coarser than the truth grid averages its footprint
            field = ndimage.uniform_filter(field, int(round(aux_res / TRUTH_RES)), mode="nearest")
        return canvas.sample(field, xs, ys)

    nir = seen(canvas.nir) * seen(canvas.shade)
    if light is not None:
        nir *= light.nir_gain
    nir = nir + rng.normal(0, 0.008, nir.shape)
    cloud = canvas.sample(canvas.cloud.astype(float), xs, ys) > 0.5
    nir = np.where(cloud, 0.55, nir)
    nir_dn = np.where(np.isnan(nir), 0, np.clip(np.round(nir * 10000), 1, 65535))
    aux_tf = Affine.translation(*shift) @ nir_tf
    _write(scene_dir / "nir.tif", nir_dn[None], UTM_CRS, aux_tf, 0, "uint16")
    ndvi = seen(canvas.ndvi) + rng.normal(0, 0.015, nir.shape)
    if light is not None:
        ndvi += light.ndvi_offset
    ndvi = np.where(cloud, np.nan, np.clip(ndvi, -1, 1))  # clouds are masked out of NDVI
    _write(scene_dir / "ndvi.tif", ndvi[None], UTM_CRS, aux_tf, np.nan, "float32")

    # Relative elevation in polar stereographic at 2 m, covering the scene's footprint.
    to_dem = Transformer.from_crs(UTM_CRS, DEM_CRS, always_xy=True)
    to_utm = Transformer.from_crs(DEM_CRS, UTM_CRS, always_xy=True)
    corner_x, corner_y = to_dem.transform([x0, x0 + extent, x0, x0 + extent], [y0, y0, y0 - extent, y0 - extent])
    left, top = math.floor(min(corner_x)) - 4, math.ceil(max(corner_y)) + 4
    width = int(math.ceil((max(corner_x) + 4 - left) / DEM_RES))
    height = int(math.ceil((top - (min(corner_y) - 4)) / DEM_RES))
    dem_tf = Affine(DEM_RES, 0.0, left, 0.0, -DEM_RES, top)
    dx, dy = _grid_coords(dem_tf, width, height)
    ux, uy = _transform_smooth(to_utm, dx, dy)
    # Relative elevation: the DEM minus its ~100 m-scale trend, so scarps stand out.
    relative = _relative_elevation(canvas.elev, 50.0 / TRUTH_RES)
    dem = canvas.sample(relative, ux, uy) + rng.normal(0, 0.05, dx.shape)
    dem = np.where(np.isnan(dem), DEM_NODATA, dem)
    if shift != (0.0, 0.0):  # the same error on the ground, as a vector in the DEM's CRS
        (ax, bx), (ay, by) = to_dem.transform([x0, x0 + shift[0]], [y0, y0 + shift[1]])
        dem_tf = Affine.translation(bx - ax, by - ay) @ dem_tf
    _write(scene_dir / "dem.tif", dem[None], DEM_CRS, dem_tf, DEM_NODATA, "float32")


def split_of(index: int, scenes: int) -> str:
    """Split by whole scene (no tile straddles two splits): the last ones test, then val."""
    n_test = max(1, round(0.2 * scenes)) if scenes >= 3 else 0
    n_val = max(1, round(0.15 * scenes)) if scenes >= 3 else 0
    if index >= scenes - n_test:
        return "test"
    if index >= scenes - n_test - n_val:
        return "val"
    return "train"


def generate_world(out: str | os.PathLike, params: WorldParams = WorldParams(), workers: int = 1) -> Path:
    """Write a world into `out` (created) and return the path of its scene list file.

    Scenes depend only on (params, index), so `workers` > 1 draws them in parallel
    processes with identical results; large scenes take over a minute each.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):  # never mixed into another world's (or anything's) files
        raise FileExistsError(f"{out}: the folder is not empty"
                              f"{' (it holds a world: scenes.yaml)' if (out / 'scenes.yaml').exists() else ''}; "
                              "generate into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    generate = _generate_site if params.dates > 1 else _generate_scene
    n = params.scenes
    if workers > 1 and n > 1:
        context = multiprocessing.get_context("spawn")  # no fork of a parent's thread pools
        with ProcessPoolExecutor(min(workers, n), mp_context=context) as pool:
            drawn = list(pool.map(generate, [out] * n, [params] * n, range(n)))
    else:
        drawn = [generate(out, params, index) for index in range(n)]
    if params.dates > 1:
        evolution.write_truth(out, *([row for d in drawn for row in d[table]]
                                     for table in ("lineage", "growth", "coregistration")))
    scene_list = out / "scenes.yaml"  # written last: a world with a scene list is complete
    entries = [entry for d in drawn for entry in d["scenes"]]
    with open(scene_list, "w") as f:
        yaml.safe_dump({"generator": {**params.described(), "version": GENERATOR_VERSION}, "scenes": entries}, f,
                       sort_keys=False)
    return scene_list


def ensure_world(
    root: str | os.PathLike,
    scenes: int = 8,
    seed: int = 0,
    size: int = 512,
    rts_per_scene: tuple[int, int] | list[int] = WorldParams.rts_per_scene,
    distractors_per_scene: tuple[int, int] | list[int] = WorldParams.distractors_per_scene,
    world: str = "auxiliary_decisive",
    rgb_separability: float | None = None,
    aux_resolution: float | None = None,
    ndvi_separability: float | None = None,
    dates: int = 1,
    years_between: float = WorldParams.years_between,
    first_date: str = WorldParams.first_date,
) -> str:
    """Generate the world once under `root/synthetic_<key>` and return its scene list path.

    `world` names a preset of `WORLDS`; `rgb_separability`, `ndvi_separability` and
    `aux_resolution`, where given, replace the preset's value. `dates` > 1 makes each scene
    a site seen at that many dates (`synthetic_evolution`).

    Safe when several processes start at once (sweep jobs): each writes to its own
    temporary directory and renames it into place; the loser of the race keeps the
    winner's copy.
    """
    sensors = {k: float(v) for k, v in (("rgb_separability", rgb_separability), ("aux_resolution", aux_resolution),
                                        ("ndvi_separability", ndvi_separability)) if v is not None}
    params = WorldParams.named(world, scenes=scenes, size=size, seed=seed, rts_per_scene=tuple(rts_per_scene),
                               distractors_per_scene=tuple(distractors_per_scene), dates=int(dates),
                               years_between=float(years_between), first_date=str(first_date), **sensors)
    root = Path(root).expanduser()
    target = root / f"synthetic_{params.key()}"
    scene_list = target / "scenes.yaml"
    if scene_list.exists():
        return str(scene_list)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        generate_world(tmp, params)
        try:
            os.rename(tmp, target)
        except OSError:
            if not scene_list.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(scene_list)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic Arctic RTS world.")
    parser.add_argument("--out", required=True, help="output directory (scene list: OUT/scenes.yaml)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="RGB pixels per scene side (4 m)")
    parser.add_argument("--world", choices=sorted(WORLDS), default="auxiliary_decisive",
                        help="what each sensor can tell on its own (module docstring)")
    parser.add_argument("--workers", type=int, default=1, help="scenes drawn in parallel processes")
    parser.add_argument("--dates", type=int, default=1,
                        help="> 1: each scene is a site seen at this many dates, its slumps evolving between "
                             "them; the truth of it in OUT/lineage.csv and OUT/growth.csv")
    parser.add_argument("--years-between", type=float, default=WorldParams.years_between,
                        help="years between a site's dates")
    parser.add_argument("--first-date", default=WorldParams.first_date, help="the first date (YYYY-MM-DD)")
    parser.add_argument("--coco-chips", help="also export the world as COCO chip folders here")
    parser.add_argument("--challenge", help="also export the world as a challenge-style .npz release here")
    args = parser.parse_args(argv)
    try:
        params = WorldParams.named(args.world, scenes=args.scenes, size=args.size, seed=args.seed, dates=args.dates,
                                   years_between=args.years_between, first_date=args.first_date)
        scene_list = generate_world(args.out, params, workers=args.workers)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(f"scene list: {scene_list}")
    if args.coco_chips or args.challenge:
        from rts_thaw.data import export

        if args.coco_chips:
            print(f"COCO chips: {export.export_coco_chips(scene_list, args.coco_chips)}")
        if args.challenge:
            print(f"challenge release: {export.export_challenge(scene_list, args.challenge)}")


if __name__ == "__main__":
    main()
