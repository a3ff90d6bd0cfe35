"""Scenes from a STAC file: a catalog or collection (with its items, followed through child
links), a single item, or an item collection (a GeoJSON FeatureCollection, as STAC APIs return).

Each item is one scene. Its id is the scene id, its datetime the acquisition date, and the
assets named in `assets` (modality -> asset key) its rasters: relative hrefs are resolved
against the item's JSON (or the item collection's file); URLs (http, https, s3, ...) are
kept as they are, for GDAL to read remotely (`geotiff.is_remote`).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pystac
from pystac.utils import make_absolute_href

from rts_thaw.data.geotiff import (LABELLED_SPLITS, REFERENCE, SPLITS, SceneError, SceneSpec, check_problems,
                                   is_remote)

STAC_SUFFIXES = (".json", ".geojson")
# The settings of a STAC source (the `stac:` block of conf/data/stac.yaml and conf/predict.yaml).
STAC_SETTINGS = ("assets", "split", "split_property", "site_property", "labels_asset", "resampling")
# What reading a STAC document can raise: a missing file, bad JSON, a document pystac refuses.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, pystac.STACError, pystac.STACTypeError)


def is_stac_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in STAC_SUFFIXES


def load_stac_scenes(path: str | Path, assets: Mapping[str, str], split: str | None = None,
                     split_property: str | None = None, site_property: str | None = None,
                     labels_asset: str | None = None, resampling: Mapping[str, str] | None = None,
                     labelled: bool = False, on_error: str = "raise") -> list[SceneSpec]:
    """The scenes of the items of a STAC file.

    assets: modality -> asset key, e.g. {"rgb": "visual", "ndvi": "ndvi"}; it must map "rgb",
        the reference grid, and every item must have every mapped asset.
    split: the split of every item, or of those without `split_property`.
    split_property: the item property holding its split (e.g. "rts:split").
    site_property: the item property naming its site (acquisitions of one area share a site);
        an item with a site must have a date.
    labels_asset: the asset key of the item's label file (a local vector file); `labelled`
        (training and evaluation) requires it on the train, val and test items.
    resampling: modality -> resampling method onto the RGB grid (default bilinear).

    Every item is checked first and one SceneError lists every problem, naming the file;
    `on_error="skip"` leaves the items with problems out instead, each logged.
    """
    path = Path(path)
    assets = dict(assets or {})
    if REFERENCE not in assets:
        raise SceneError(f"{path}: stac.assets must map '{REFERENCE}' (the reference grid) to an asset key; "
                         f"got {assets or 'nothing'}")
    if split is None and split_property is None:
        raise SceneError(f"{path}: set stac.split (one split for every item) or stac.split_property "
                         "(the item property holding each item's split)")
    if split is not None and split not in SPLITS:
        raise SceneError(f"{path}: stac.split={split!r} is not one of {SPLITS}")
    items, problems = read_items(path)
    if not items and not problems:
        raise SceneError(f"{path}: the STAC file has no items")
    scenes, seen = [], set()
    for item, start in items:
        found = []
        if item.id in seen:
            found.append(f"item {item.id}: duplicate item id (scene ids must be unique)")
        seen.add(item.id)
        scene = _item_scene(item, start, assets, split, split_property, site_property, labels_asset, labelled, found)
        problems += found
        if not found:
            scene.resampling = dict(resampling or {})
            scenes.append(scene)
    check_problems(problems, on_error, "STAC item", where=path)
    return scenes


def read_items(path: Path) -> tuple[list[tuple[pystac.Item, str]], list[str]]:
    """Each item of a STAC file with the href its relative asset hrefs start from, and the
    problems of the items that cannot be read (a file that cannot be read at all raises)."""
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise SceneError(f"{path}: cannot read STAC file ({err.strerror})") from err
    except ValueError as err:  # not JSON, or not text
        raise SceneError(f"{path}: not a JSON file ({err})") from err
    kind = doc.get("type") if isinstance(doc, dict) else None
    start = str(path.resolve())
    if kind == "FeatureCollection":  # an item collection: its items have no files of their own
        features = doc.get("features")
        if not isinstance(features, list):
            raise SceneError(f"{path}: an item collection needs a 'features' list")
        items, problems = [], []
        for i, feature in enumerate(features):
            try:
                items.append((pystac.Item.from_dict(feature), start))
            except READ_ERRORS as err:
                name = feature.get("id") if isinstance(feature, dict) else None
                problems.append(f"feature #{i}" + (f" ({name})" if name else "") + f": not a STAC item ({err})")
        return items, problems
    if kind not in ("Catalog", "Collection", "Feature"):
        raise SceneError(f"{path}: not a STAC catalog, collection, item or item collection (its type is {kind!r})")
    try:
        stac = pystac.read_dict(doc, href=start)
    except READ_ERRORS as err:
        raise SceneError(f"{path}: not a readable STAC {kind.lower()} ({err})") from err
    if isinstance(stac, pystac.Item):
        return [(stac, start)], []
    items, problems = [], []
    _catalog_items(stac, items, problems)
    return items, problems


def _catalog_items(catalog: pystac.Catalog, items: list, problems: list[str]) -> None:
    """The items of a catalog and of its children, link by link, so that one unreadable item
    is reported by its href and the others are still read."""
    root = catalog.get_root()
    for link in catalog.get_item_links():
        item = _resolved(link, root, problems, "item")
        if isinstance(item, pystac.Item):
            items.append((item, item.get_self_href() or link.get_absolute_href()))
    for link in catalog.get_child_links():
        child = _resolved(link, root, problems, "child catalog")
        if isinstance(child, pystac.Catalog):
            _catalog_items(child, items, problems)


def _resolved(link: pystac.Link, root, problems: list[str], what: str):
    try:
        target = link.resolve_stac_object(root=root).target
    except READ_ERRORS as err:
        cause = err.__cause__ or err  # pystac wraps the reason (a missing file, bad JSON) in its own error
        problems.append(f"{what} {link.get_absolute_href()}: cannot be read ({type(cause).__name__}: {cause})")
        return None
    return target


def _item_scene(item: pystac.Item, start: str, assets: dict[str, str], split: str | None, split_property: str | None,
                site_property: str | None, labels_asset: str | None, labelled: bool,
                problems: list[str]) -> SceneSpec | None:
    """One item as a scene, or None with its problems added to `problems`."""
    where = f"item {item.id}"
    has = ", ".join(sorted(item.assets)) or "none"
    missing = [key for key in assets.values() if key not in item.assets]
    if missing:
        problems.append(f"{where}: no asset {', '.join(map(repr, missing))} (its assets: {has})")
    scene_split = item.properties.get(split_property) if split_property else None
    if scene_split is None:
        scene_split = split
        if split is None:
            problems.append(f"{where}: no property {split_property!r}{_closest(split_property, item.properties)} "
                            "and no stac.split for items without it")
    elif scene_split not in SPLITS:
        problems.append(f"{where}: split {scene_split!r} (property {split_property!r}) is not one of {SPLITS}")
    labels = None
    if labels_asset and labels_asset in item.assets:
        labels = _location(item.assets[labels_asset], start)
        if is_remote(labels):
            problems.append(f"{where}: label asset {labels_asset!r} is remote ({labels}); label files must be local")
    elif labelled and scene_split in LABELLED_SPLITS:
        need = (f"no asset {labels_asset!r} (its assets: {has})" if labels_asset
                else "set stac.labels_asset to the asset key of the label files")
        problems.append(f"{where}: a {scene_split} scene needs labels: {need}")
    site = None
    if site_property:
        site = item.properties.get(site_property)
        if site is None:
            problems.append(f"{where}: no property {site_property!r}{_closest(site_property, item.properties)}")
    date = item_date(item)
    if site is not None and date is None:
        problems.append(f"{where}: no acquisition date (its datetime is null and start_datetime .. end_datetime "
                        "spans more than a day), which a scene with a site needs")
    if problems:
        return None
    return SceneSpec(id=item.id, split=scene_split, date=date, site=None if site is None else str(site),
                     rasters={m: _location(item.assets[key], start) for m, key in assets.items()}, labels=labels)


def item_date(item: pystac.Item) -> str | None:
    """An item's acquisition date (ISO); from a start..end range only when it lies within one day."""
    if item.datetime is not None:
        return item.datetime.date().isoformat()
    start, end = item.common_metadata.start_datetime, item.common_metadata.end_datetime
    if start is not None and end is not None and start.date() == end.date():
        return start.date().isoformat()
    return None


def _location(asset: pystac.Asset, start: str) -> Path | str:
    """Where an asset is: its URL, or a local path (relative hrefs start from the item's file)."""
    href = asset.get_absolute_href() or make_absolute_href(asset.href, start)
    if is_remote(href):
        return href
    parsed = urlparse(href)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(href)


def _closest(name: str | None, properties: Mapping) -> str:
    close = difflib.get_close_matches(str(name), [str(key) for key in properties], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
