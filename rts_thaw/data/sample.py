"""Assembling one sample of the data contract from raw arrays (every source uses it)."""

from __future__ import annotations

import numpy as np
import torch

from rts_thaw.data.targets import masks_to_target


def make_sample(images: dict, valid: np.ndarray, masks: np.ndarray, meta: dict, norm_stats=None, augment=None,
                min_area: int = 1) -> dict:
    """Raw numpy arrays -> a sample of the data contract (normalised, augmented)."""
    if norm_stats is not None:
        images = norm_stats.normalize_arrays(images, valid)
    if augment is not None:
        images, valid, masks, moved = augment(images, valid, masks)
        if moved:
            meta = {**meta, "transform": None}  # no longer a georeferenced window
    return {
        "image": {m: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for m, a in images.items()},
        "valid": torch.from_numpy(np.ascontiguousarray(valid)),
        "target": masks_to_target(masks, min_area),
        "meta": meta,
    }
