"""Multimodal GeoTIFF scenes read as aligned tiles on the RGB raster's grid.

A scene is one raster per modality plus an optional vector file of RTS polygons.
The RGB raster is the reference: its grid is the tile grid, and every other
modality is read through a warped window onto it, whatever its CRS, resolution or
dtype. Tiles are windowed reads; a whole scene is never loaded to make one.
"""

from __future__ import annotations

import difflib
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import rasterio
import shapely
import yaml
from pyproj import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from affine import Affine
from rasterio.transform import array_bounds
from rasterio.windows import Window
from torch.utils.data import Dataset

from rts_thaw.core.lineage import iso_date
from rts_thaw.core.problems import listed
from rts_thaw.core.vectors import crs_problem, read_layer, reproject
from rts_thaw.data.sample import make_sample

log = logging.getLogger(__name__)

REFERENCE = "rgb"
SPLITS = ("train", "val", "test", "predict")
# Bands each modality must have; a modality not listed here takes what its file has.
EXPECTED_BANDS = {"rgb": (3,), "ndvi": (1,), "nir": (1,), "ndwi": (1,), "dem": (1, 2)}


class SceneError(ValueError):
    """A scene's files are missing, unreadable or inconsistent (the message names the file)."""


# Rasters at these URLs are read where they are (GDAL's /vsicurl/, /vsis3/, ...); credentials and
# options (AWS_NO_SIGN_REQUEST, GDAL_HTTP_*, ...) are GDAL's environment settings.
REMOTE_SCHEMES = ("http", "https", "s3", "gs", "az")


def is_remote(href: str | Path) -> bool:
    """Whether a raster lives at a URL (or a GDAL virtual path) rather than in a local file."""
    href = str(href)
    return href.startswith("/vsi") or urlparse(href).scheme.lower() in REMOTE_SCHEMES


def resolve_href(folder: Path, href: str) -> Path | str:
    """A raster's location: a URL as it is (a Path would fold its '//'), a relative path under `folder`."""
    return href if is_remote(href) else folder / href


@dataclass
class SceneSpec:
    id: str
    split: str
    rasters: dict[str, Path | str]  # local files, or URLs GDAL reads remotely (is_remote)
    labels: Path | None = None
    resampling: dict[str, str] = field(default_factory=dict)
    date: str | None = None  # ISO acquisition date; the acquisitions of one area share a site
    site: str | None = None


SCENE_KEYS = ("id", "split", "rasters", "labels", "resampling", "date", "site")

LABELLED_SPLITS = ("train", "val", "test")


def _scene_problems(entry, where: str, labelled: bool) -> list[str]:
    """Everything wrong with one scene-list entry (an unknown key names the closest valid one)."""
    if not isinstance(entry, dict):
        return [f"{where}: an entry must be a mapping with {', '.join(SCENE_KEYS[:3])}"]
    problems = []
    for key in entry:
        if key not in SCENE_KEYS:
            close = difflib.get_close_matches(str(key), SCENE_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(SCENE_KEYS)}"
            problems.append(f"{where}: unknown key {key!r} ({hint})")
    missing = [key for key in ("id", "split", "rasters") if key not in entry]
    if missing:
        problems.append(f"{where}: no {', '.join(missing)}")
    split = entry.get("split")
    if "split" in entry and split not in SPLITS:
        problems.append(f"{where}: split {split!r} is not one of {SPLITS}")
    if labelled and split in LABELLED_SPLITS and not entry.get("labels"):
        problems.append(f"{where}: a {split} scene needs 'labels' (an empty label file for a scene with no slumps)")
    if "rasters" in entry and (not isinstance(entry["rasters"], dict) or REFERENCE not in entry["rasters"]):
        problems.append(f"{where}: no '{REFERENCE}' raster, the reference grid")
    if "date" in entry and iso_date(entry["date"]) is None:
        problems.append(f"{where}: date {entry['date']!r} is not an ISO date (YYYY-MM-DD)")
    return problems


def load_scene_list(path: str | Path, labelled: bool = False, on_error: str = "raise") -> list[SceneSpec]:
    """Read a scene list YAML (paths relative to the file) into SceneSpecs. Every entry is
    checked first and one error lists every problem; `labelled` (training and evaluation)
    also requires labels for the train, val and test scenes. `on_error="skip"` leaves the
    entries with problems out instead, each logged."""
    path = Path(path)
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as err:
        raise SceneError(f"{path}: cannot read scene list ({err.strerror})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("scenes"), list):
        raise SceneError(f"{path}: a scene list needs a top-level 'scenes:' list")
    problems, seen, good = [], set(), []
    for i, entry in enumerate(doc["scenes"]):
        scene_id = entry.get("id") if isinstance(entry, dict) else None
        where = f"scene #{i}" + (f" ({scene_id})" if scene_id is not None else "")
        found = _scene_problems(entry, where, labelled)
        if scene_id is not None and scene_id in seen:
            found.append(f"{where}: duplicate scene id {scene_id!r}")
        seen.add(scene_id)
        problems += found
        if not found:
            good.append(entry)
    check_problems(problems, on_error, "scene-list entry", where=path)
    return [SceneSpec(id=str(entry["id"]), split=entry["split"],
                      rasters={m: resolve_href(path.parent, str(p)) for m, p in entry["rasters"].items()},
                      labels=(path.parent / entry["labels"]) if entry.get("labels") else None,
                      resampling=dict(entry.get("resampling", {})),
                      date=iso_date(entry["date"]) if "date" in entry else None,
                      site=str(entry["site"]) if entry.get("site") is not None else None)
            for entry in good]


ON_ERROR = ("raise", "skip")


def check_problems(problems: list[str], on_error: str, item: str, where: str | Path | None = None) -> None:
    """Every problem found in a data source (of the file `where`, or each naming its own): one
    SceneError that lists them all (on_error="raise"), or one warning per skipped item ("skip")."""
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}: use one of {list(ON_ERROR)}")
    if not problems:
        return
    prefix = f"{where}: " if where else ""
    if on_error == "raise":
        raise SceneError(f"{prefix}{listed(problems)} (data.on_error=skip leaves such items out, each logged)")
    for problem in problems:
        log.warning("skipped a %s (data.on_error=skip): %s%s", item, prefix, problem)


def tile_windows(width: int, height: int, tile_size: int, stride: int | None = None) -> list[Window]:
    """Windows of tile_size covering the grid; the last row/column is shifted back to
    end at the edge, so every pixel is covered and no tile hangs off the raster."""
    stride = stride or tile_size
    if tile_size <= 0 or stride <= 0:
        raise ValueError(f"tile_size and stride must be positive, got {tile_size}, {stride}")

    def starts(extent: int) -> list[int]:
        if extent <= tile_size:
            return [0]
        offsets = list(range(0, extent - tile_size + 1, stride))
        if offsets[-1] + tile_size < extent:
            offsets.append(extent - tile_size)
        return offsets

    return [
        Window(col, row, min(tile_size, width), min(tile_size, height))
        for row in starts(height) for col in starts(width)
    ]


def _open(path: Path | str, scene_id: str, modality: str):
    if not is_remote(path) and not Path(path).exists():
        raise SceneError(f"{path}: {modality} raster of scene {scene_id} does not exist")
    try:
        src = rasterio.open(path)
    except RasterioIOError as err:
        raise SceneError(f"{path}: {modality} raster of scene {scene_id} is not a readable raster ({err})") from err
    if src.crs is None:
        src.close()
        raise SceneError(f"{path}: {modality} raster of scene {scene_id} has no CRS; georeference it (e.g. gdal_edit.py -a_srs)")
    return src


class SceneReader:
    """Reads windows of one scene's modalities on the reference (RGB) grid.

    `read(window)` returns raw values (not normalised) as float32 [C,h,w] per
    modality and a validity mask [h,w] that is False wherever the reference or any
    requested modality has nodata/NaN; invalid pixels are zero-filled.

    An `optional` modality (one the model can map without) may have no raster in the
    scene, and is left out of a window where it covers less than `MIN_OPTIONAL_COVER` of
    the reference's valid pixels (a cloud over NDVI), instead of invalidating the window.
    """

    MIN_OPTIONAL_COVER = 0.5

    def __init__(self, spec: SceneSpec, modalities: list[str] | tuple[str, ...],
                 optional: list[str] | tuple[str, ...] = ()):
        self.spec = spec
        self.optional = [m for m in optional if m in modalities and m != REFERENCE]
        self.absent = [m for m in self.optional if m not in spec.rasters]
        self.modalities = [m for m in modalities if m not in self.absent]
        missing = [m for m in self.modalities if m not in spec.rasters]
        if missing:
            raise SceneError(f"scene {spec.id}: no raster for modalities {missing} (has {sorted(spec.rasters)})")
        self._ref = _open(spec.rasters[REFERENCE], spec.id, REFERENCE)
        self.crs, self.transform = self._ref.crs, self._ref.transform
        self.width, self.height = self._ref.width, self._ref.height
        self._sources: dict[str, rasterio.io.DatasetReaderBase] = {}
        self._opened = [self._ref]
        try:
            for m in self.modalities:
                self._sources[m] = self._aligned(m)
        except Exception:
            self.close()
            raise
        self.channels = {m: self._sources[m].count for m in self.modalities}

    def _aligned(self, modality: str):
        if modality == REFERENCE:
            src = self._ref
        else:
            src = _open(self.spec.rasters[modality], self.spec.id, modality)
            self._opened.append(src)
        path = self.spec.rasters[modality]
        expected = EXPECTED_BANDS.get(modality)
        if expected and src.count not in expected:
            raise SceneError(f"{path}: {modality} raster has {src.count} band(s), expected {' or '.join(map(str, expected))}")
        if modality == REFERENCE:
            return src
        ref_bounds = self._ref.bounds
        left, bottom, right, top = transform_bounds(src.crs, self.crs, *src.bounds)
        if left >= ref_bounds.right or right <= ref_bounds.left or bottom >= ref_bounds.top or top <= ref_bounds.bottom:
            raise SceneError(
                f"{path}: {modality} raster does not overlap the reference grid of scene {self.spec.id} "
                f"({self.spec.rasters[REFERENCE]}); check its CRS and extent"
            )
        if src.crs == self.crs and src.transform == self.transform and src.shape == self._ref.shape:
            return src  # already on the reference grid
        resampling = Resampling[self.spec.resampling.get(modality, "bilinear")]
        vrt = WarpedVRT(
            src, crs=self.crs, transform=self.transform, width=self.width, height=self.height,
            resampling=resampling, add_alpha=src.nodata is None,  # alpha marks off-raster pixels
        )
        self._opened.append(vrt)
        return vrt

    def read(self, window: Window, out_shape: tuple[int, int] | None = None):
        h, w = out_shape or (int(window.height), int(window.width))
        images, covers = {}, {}
        if REFERENCE in self.modalities:
            valid = np.ones((h, w), dtype=bool)
        else:  # the reference footprint bounds every tile, served or not
            _, valid = self._read_source(self._ref, window, (h, w))
        for m in self.modalities:
            try:
                images[m], covers[m] = self._read_source(self._sources[m], window, (h, w))
            except RasterioIOError as err:  # a file truncated or corrupt past its header
                raise SceneError(f"{self.spec.rasters[m]}: {m} raster of scene {self.spec.id} cannot be read at "
                                 f"window (row {int(window.row_off)}, col {int(window.col_off)}, "
                                 f"{int(window.height)} x {int(window.width)}): {err}") from err
        if REFERENCE in covers:
            valid &= covers[REFERENCE]
        seen = max(int(valid.sum()), 1)
        for m in self.optional:
            if m in covers and (covers[m] & valid).sum() < self.MIN_OPTIONAL_COVER * seen:
                del images[m], covers[m]  # too little of it here: the model maps without it
        for ok in covers.values():
            valid &= ok

        for data in images.values():
            data[:, ~valid] = 0.0
            np.nan_to_num(data, copy=False)
        return images, valid

    @staticmethod
    def _read_source(src, window: Window, shape: tuple[int, int]):
        """float32 [C,h,w] and validity. With a nodata value, validity comes from the
        values (a pixel is nodata where every band is); otherwise from GDAL's mask
        (the alpha band of a warped read), which costs a second warp."""
        data = src.read(list(range(1, src.count + 1)), window=window, out_shape=(src.count, *shape), masked=False).astype(np.float32)
        valid = np.isfinite(data).all(axis=0)
        nodata = src.nodata
        if nodata is not None and not math.isnan(nodata):
            valid &= (data != nodata).any(axis=0)
        elif nodata is None:
            valid &= src.read_masks(1, window=window, out_shape=shape) > 0
        return data, valid

    def valid_fraction(self, window: Window, factor: int = 4) -> float:
        """Fraction of valid pixels in a window, from a decimated read (cheap)."""
        h = max(1, int(window.height) // factor)
        w = max(1, int(window.width) // factor)
        _, valid = self.read(window, out_shape=(h, w))
        return float(valid.mean())

    def window_transform(self, window: Window) -> Affine:
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def close(self) -> None:
        for src in reversed(self._opened):
            src.close()
        self._opened = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # handles are not picklable; each worker reopens its own
        return {"spec": self.spec, "modalities": self.modalities}

    def __setstate__(self, state):
        self.__init__(state["spec"], state["modalities"])


def load_labels(path: Path, scene_crs, scene_bounds: tuple[float, float, float, float], scene_id: str) -> list:
    """RTS polygons in the scene CRS. Labels in another CRS are reprojected; labels
    outside the scene are dropped with a warning; an empty file means no slumps."""
    path = Path(path)
    if not path.exists():
        raise SceneError(f"{path}: label file of scene {scene_id} does not exist")
    try:
        layer = read_layer(path)
    except ValueError as err:
        raise SceneError(f"{path}: label file of scene {scene_id} is not a readable vector file ({err})") from err
    if not len(layer):
        return []
    problem = crs_problem(layer)
    if problem:
        raise SceneError(f"{path}: label file of scene {scene_id} {problem}")
    geoms = [g for g in layer.geometries if g is not None and not g.is_empty]
    label_crs = layer.crs
    geoms = reproject(geoms, CRS.from_user_input(label_crs).to_wkt(), CRS.from_user_input(scene_crs).to_wkt())
    geoms = [shapely.make_valid(g) if not g.is_valid else g for g in geoms]
    polygons = [g for g in geoms if g.geom_type in ("Polygon", "MultiPolygon")]
    if len(polygons) < len(geoms):
        warnings.warn(f"{path}: {len(geoms) - len(polygons)} non-polygon label feature(s) ignored", stacklevel=2)
    scene_box = shapely.box(*scene_bounds)
    inside = [g for g in polygons if g.intersects(scene_box)]
    if polygons and not inside:
        raise SceneError(f"{path}: none of the {len(polygons)} label polygon(s) of scene {scene_id} lies within "
                         "the scene; is this the scene's label file, in its CRS?")
    if len(inside) < len(polygons):
        warnings.warn(f"{path}: {len(polygons) - len(inside)} label polygon(s) lie outside scene {scene_id} and were dropped", stacklevel=2)
    return inside


def rasterize_instances(polygons: list, tile_transform, shape: tuple[int, int], min_area: int) -> np.ndarray:
    """One uint8 mask per polygon on the tile grid; fragments under min_area px dropped."""
    masks = []
    for poly in polygons:
        mask = rasterize([poly], out_shape=shape, transform=tile_transform, dtype="uint8")
        if int(mask.sum()) >= min_area:
            masks.append(mask)
    if not masks:
        return np.zeros((0, *shape), dtype=np.uint8)
    return np.stack(masks)


@dataclass
class _Tile:
    scene: int
    window: Window


class GeoTiffTileDataset(Dataset):
    """Aligned multimodal tiles with instance targets, from the scenes of one split.

    A tile is kept when at least `min_valid_fraction` of it is valid in the
    reference and in every requested modality. `windows` replaces the tiling with
    given (scene index, window) pairs.
    """

    def __init__(
        self,
        scenes: list[SceneSpec],
        modalities: list[str],
        tile_size: int = 128,
        stride: int | None = None,
        min_valid_fraction: float = 0.5,
        min_instance_area: int = 10,
        norm_stats=None,
        augment=None,
        source: str = "geotiff",
        windows: list[tuple[int, Window]] | None = None,
        on_error: str = "raise",
    ):
        self.scenes = list(scenes)
        self.modalities = list(modalities)
        self.tile_size, self.stride = tile_size, stride or tile_size
        self.min_instance_area = min_instance_area
        self.norm_stats, self.augment, self.source = norm_stats, augment, source
        self._readers: dict[int, SceneReader] = {}
        self._labels: dict[int, tuple[list, shapely.STRtree | None]] = {}
        self.tiles: list[_Tile] = []
        self.channels: dict[str, int] = {}
        if windows is not None:  # given windows (scene index, window), no tiling or filtering
            self.tiles = [_Tile(scene, window) for scene, window in windows]
            for spec in self.scenes:
                with SceneReader(spec, self.modalities) as reader:
                    self.channels = self.channels or dict(reader.channels)
            return
        # Every scene is checked before any work (rasters, labels, usable tiles); the problems
        # of all of them are reported at once, or the scenes with problems left out (on_error).
        problems, kept = [], []
        for spec in self.scenes:
            try:
                tiles, polygons = self._checked_scene(spec, min_valid_fraction)
            except SceneError as err:
                problems.append(str(err))
                continue
            kept.append(spec)
            self.tiles += [_Tile(len(kept) - 1, window) for window in tiles]
            self._labels[len(kept) - 1] = (polygons, shapely.STRtree(polygons) if polygons else None)
        check_problems(problems, on_error, "scene")
        self.scenes = kept

    def _checked_scene(self, spec: SceneSpec, min_valid_fraction: float) -> tuple[list[Window], list]:
        """The scene's tiles with enough valid pixels and its label polygons, after checking its
        rasters and labels (a bad label file fails here, not at its first tile)."""
        with SceneReader(spec, self.modalities) as reader:
            self.channels = self.channels or dict(reader.channels)
            polygons = load_labels(spec.labels, reader.crs, scene_bounds(reader), spec.id) if spec.labels else []
            windows = [window for window in tile_windows(reader.width, reader.height, self.tile_size, self.stride)
                       if reader.valid_fraction(window) >= min_valid_fraction]
        if not windows:
            raise SceneError(f"scene {spec.id} ({spec.rasters[REFERENCE]}): no tile has {min_valid_fraction:.0%} "
                             f"valid pixels in {self.modalities} (nodata/NaN everywhere in a modality?)")
        return windows, polygons

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self):  # open handles stay behind; each worker opens its own
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state

    def reader(self, scene: int) -> SceneReader:
        if scene not in self._readers:
            self._readers[scene] = SceneReader(self.scenes[scene], self.modalities)
        return self._readers[scene]

    def polygons(self, scene: int):
        if scene not in self._labels:
            spec, reader = self.scenes[scene], self.reader(scene)
            polys = []
            if spec.labels is not None:
                polys = load_labels(spec.labels, reader.crs, scene_bounds(reader), spec.id)
            self._labels[scene] = (polys, shapely.STRtree(polys) if polys else None)
        return self._labels[scene]

    def read_tile(self, index: int):
        """Raw (unnormalised) images, validity and instance masks of one tile."""
        tile = self.tiles[index]
        reader = self.reader(tile.scene)
        images, valid = reader.read(tile.window)
        polys, tree = self.polygons(tile.scene)
        tile_tf = reader.window_transform(tile.window)
        shape = valid.shape
        if tree is not None:
            hits = tree.query(shapely.box(*array_bounds(*shape, tile_tf)))
            masks = rasterize_instances([polys[j] for j in sorted(hits)], tile_tf, shape, self.min_instance_area)
        else:
            masks = np.zeros((0, *shape), dtype=np.uint8)
        return images, valid, masks

    def __getitem__(self, index: int) -> dict:
        tile = self.tiles[index]
        images, valid, masks = self.read_tile(index)
        reader = self.reader(tile.scene)
        meta = {
            "image_id": index,
            "scene_id": self.scenes[tile.scene].id,
            "window": (int(tile.window.row_off), int(tile.window.col_off), int(tile.window.height), int(tile.window.width)),
            "transform": tuple(reader.window_transform(tile.window))[:6],
            "crs": reader.crs.to_wkt(),
            "source": self.source,
        }
        return make_sample(images, valid, masks, meta, self.norm_stats, self.augment)


def scene_bounds(reader: SceneReader) -> tuple[float, float, float, float]:
    return array_bounds(reader.height, reader.width, reader.transform)


def iter_scene_blocks(spec: SceneSpec, modality: str, block: int = 256):
    """(raw [C,h,w], valid [h,w]) blocks of one modality over a whole scene, for
    streaming statistics."""
    with SceneReader(spec, [modality]) as reader:
        for window in tile_windows(reader.width, reader.height, block):
            images, valid = reader.read(window)
            yield images[modality], valid
