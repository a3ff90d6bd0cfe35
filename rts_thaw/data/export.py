"""Export GeoTIFF scenes (e.g. the synthetic world) as COCO chip folders and as a
challenge-style .npz release, so the chip loaders are tested on the same content.

Chips are cut on the reference grid with sizes that vary from scene to scene
(chip datasets rarely have one size); chips mostly nodata are skipped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from rts_thaw.core.classes import RTS_CATEGORY
from rts_thaw.core.rle import mask_to_rle
from rts_thaw.data.chips import CHALLENGE_BANDS
from rts_thaw.data.targets import boxes_from_masks
from rts_thaw.data.geotiff import SceneReader, load_labels, load_scene_list, rasterize_instances, tile_windows, scene_bounds

CHIP_SIZES = (96, 128, 160)
# 8-bit PNG encodings of the single-band modalities: value -> (value - offset) * gain.
PNG_SCALE = {"ndvi": (-1.0, 127.5), "nir": (0.0, 255 / 10000 * 2), "dem": (-10.0, 255 / 20)}


def _chips(scene_list: str | Path, modalities: list[str], min_valid: float = 0.5, min_area: int = 10):
    """(split, scene_id, chip index, images, valid, masks) for every chip of every scene."""
    for i, spec in enumerate(load_scene_list(scene_list)):
        size = CHIP_SIZES[i % len(CHIP_SIZES)]
        with SceneReader(spec, modalities) as reader:
            polygons = load_labels(spec.labels, reader.crs, scene_bounds(reader), spec.id) if spec.labels else []
            for k, window in enumerate(tile_windows(reader.width, reader.height, size)):
                images, valid = reader.read(window)
                if valid.mean() < min_valid:
                    continue
                masks = rasterize_instances(polygons, reader.window_transform(window), valid.shape, min_area)
                masks = masks * valid.astype(np.uint8)  # no slump where nothing was seen
                masks = masks[masks.reshape(len(masks), -1).sum(axis=1) >= min_area] if len(masks) else masks
                yield spec.split, spec.id, k, images, valid, masks


def _annotation(ann_id: int, image_id: int, mask: np.ndarray) -> dict:
    (x0, y0, x1, y1), = boxes_from_masks(mask[None]).tolist()
    return {
        "id": ann_id, "image_id": image_id, "category_id": RTS_CATEGORY["id"], "iscrowd": 0,
        "segmentation": mask_to_rle(mask), "area": float(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
    }


def _coco(images: list, annotations: list) -> dict:
    return {"images": images, "annotations": annotations, "categories": [RTS_CATEGORY]}


def _to_png(modality: str, data: np.ndarray) -> np.ndarray:
    if modality == "rgb":
        return np.clip(np.moveaxis(data, 0, -1), 0, 255).astype(np.uint8)
    offset, gain = PNG_SCALE[modality]
    return np.clip(np.round((data[0] - offset) * gain), 0, 255).astype(np.uint8)


def export_coco_chips(scene_list: str | Path, out: str | Path, modalities=("rgb", "ndvi", "nir", "dem")) -> Path:
    """COCO chip folders OUT/<split>/{annotations.json, rgb/, ndvi/, ...}: 8-bit PNGs
    (scales in PNG_SCALE), polygons as compressed RLE."""
    out = Path(out)
    per_split: dict[str, tuple[list, list]] = {}
    image_id = ann_id = 0
    for split, scene_id, k, images, valid, masks in _chips(scene_list, list(modalities)):
        image_id += 1
        name = f"{scene_id}_{k:03d}.png"
        records, anns = per_split.setdefault(split, ([], []))
        for m, data in images.items():
            (out / split / m).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_to_png(m, data)).save(out / split / m / name)
        h, w = valid.shape
        records.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for mask in masks:
            ann_id += 1
            anns.append(_annotation(ann_id, image_id, mask))
    for split, (records, anns) in per_split.items():
        (out / split / "annotations.json").write_text(json.dumps(_coco(records, anns)))
    return out


def _hillshade(dem: np.ndarray, azimuth: float = 315.0, altitude: float = 45.0, pixel: float = 4.0) -> np.ndarray:
    dy, dx = np.gradient(dem, pixel)
    slope = np.arctan(np.hypot(dx, dy))
    aspect = np.arctan2(-dx, dy)
    az, alt = np.radians(azimuth), np.radians(altitude)
    shade = np.sin(alt) * np.cos(slope) + np.cos(alt) * np.sin(slope) * np.cos(az - aspect)
    return np.clip(shade, 0, 1) * 255


def export_challenge(scene_list: str | Path, out: str | Path) -> Path:
    """A release laid out like the GeoAI Arctic Challenge 2026:
    train and val scenes become train/, test scenes the unlabelled test/ with its
    manifest. Their labels go to metadata/test_ground_truth.json, which the real
    release does not have, so synthetic submissions can be scored."""
    out = Path(out)
    for folder in ("train/images", "train/annotations", "test/images", "metadata"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    records = {"train": [], "test": []}
    anns = {"train": [], "test": []}
    image_id = ann_id = 0
    for split, scene_id, k, images, valid, masks in _chips(scene_list, ["rgb", "ndvi", "nir", "dem"]):
        part = "test" if split == "test" else "train"
        image_id += 1
        name = f"{scene_id}_{k:03d}.npz"
        red, green, blue = images["rgb"]
        nir = images["nir"][0] / 10000.0
        rel = images["dem"][0]
        ndwi = (green / 255.0 - nir) / np.maximum(green / 255.0 + nir, 1e-6)
        bands = {"red": red, "green": green, "blue": blue, "ndvi": images["ndvi"][0], "relative_elevation": rel,
                 "shaded_relief": _hillshade(rel), "nir": nir, "ndwi": ndwi}
        stack = np.stack([bands[b] for b in CHALLENGE_BANDS], axis=-1).astype(np.float32)
        stack[~valid] = np.nan
        np.savez(out / part / "images" / name, image=stack)
        h, w = valid.shape
        records[part].append({"id": image_id, "file_name": name, "height": h, "width": w})
        for mask in masks:
            ann_id += 1
            anns[part].append(_annotation(ann_id, image_id, mask))
    (out / "train/annotations/instances_train.json").write_text(json.dumps(_coco(records["train"], anns["train"])))
    with open(out / "metadata/test_manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "file_name"])
        writer.writerows([r["id"], r["file_name"]] for r in records["test"])
    (out / "metadata/test_ground_truth.json").write_text(json.dumps(_coco(records["test"], anns["test"])))
    return out
