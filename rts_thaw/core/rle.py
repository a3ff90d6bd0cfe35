"""COCO run-length encoding of masks, through pycocotools."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a 2-D binary mask, JSON-ready (counts as str)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def compressed_rle(segmentation, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as compressed RLE."""
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, *segmentation["size"])
    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return rle


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation as a uint8 [height, width] mask."""
    return mask_utils.decode(compressed_rle(segmentation, height, width))


def mask_area(segmentation, height: int, width: int) -> float:
    """Pixels of any COCO segmentation."""
    return float(mask_utils.area(compressed_rle(segmentation, height, width)))


def mask_box(segmentation, height: int, width: int) -> list[float]:
    """The tight [x, y, width, height] box of any COCO segmentation, in pixels."""
    return [float(v) for v in mask_utils.toBbox(compressed_rle(segmentation, height, width))]
