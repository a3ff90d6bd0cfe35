"""Instance targets built from masks, so boxes and masks always agree."""

from __future__ import annotations

import numpy as np
import torch

from rts_thaw.core.classes import RTS_LABEL



def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy pixel boxes [N,4] (x2/y2 exclusive) of non-empty masks [N,H,W]."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def masks_to_target(masks: np.ndarray | torch.Tensor, min_area: int = 1) -> dict:
    """{"boxes", "labels", "masks"} tensors from instance masks [N,H,W]; masks
    under min_area pixels (fragments, or emptied by a crop) are dropped.

    Built in numpy: on small tiles torch's thread pool costs more than the work."""
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.shape[0]:
        masks = masks[masks.reshape(masks.shape[0], -1).sum(axis=1) >= max(min_area, 1)]
    masks = np.ascontiguousarray(masks)
    return {
        "boxes": torch.from_numpy(boxes_from_masks(masks)),
        "labels": torch.full((masks.shape[0],), RTS_LABEL, dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }
