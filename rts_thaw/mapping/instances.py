"""Scene-level instances: a detected slump as a mask cropped to its box, placed on the scene grid.

`TileDetections` is what leaves the accelerator for one tile (boxes, scores and each mask
at the heads' resolution, M x M over its box); `tile_instances` pastes those masks into
the tile and turns them into `SceneInstance`s. The pasting is CPU work done where the
scene is finished, not in the loop that feeds the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image


@dataclass
class SceneInstance:
    """One slump on the scene's reference grid.

    `mask` covers rows `row .. row + mask.shape[0]` and columns `col .. col + mask.shape[1]`
    of the scene; `window` is the (row_off, col_off, height, width) of the tile it was
    seen in (None once instances from several tiles are merged).
    """

    row: int
    col: int
    mask: np.ndarray  # bool [h, w]
    score: float
    window: tuple[int, int, int, int] | None = None
    tile: int = -1
    n_tiles: int = 1
    modalities: tuple[str, ...] = ()  # the inputs the model had where it saw the slump

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1), end-exclusive, in scene pixels."""
        return self.row, self.col, self.row + self.mask.shape[0], self.col + self.mask.shape[1]

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask on the whole grid of `shape` (a chip's H x W), bool."""
        full = np.zeros(shape, dtype=bool)
        r0, c0, r1, c1 = self.bounds
        full[r0:r1, c0:c1] = self.mask
        return full


def crop_to_content(mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """(row, col, cropped mask) of the smallest box holding the mask, None if empty."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    r0, r1 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    c0, c1 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    return int(r0), int(c0), mask[r0:r1, c0:c1]


def instances_from_tile(prediction: dict, window: tuple[int, int, int, int], valid: np.ndarray,
                        tile: int, min_pixels: int = 4, modalities: tuple[str, ...] = ()) -> list[SceneInstance]:
    """Turn one tile's detector output (masks already thresholded) into scene instances.

    Pixels where the input was invalid (nodata) are removed from every mask: the
    model saw zeros there, not land, so nothing it says about them is kept.
    """
    row_off, col_off, height, width = window
    masks = prediction["masks"]
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    scores = prediction["scores"]
    scores = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    valid = np.asarray(valid, dtype=bool)[:height, :width]
    instances = []
    for mask, score in zip(masks[:, :height, :width] & valid, scores):
        if mask.sum() < min_pixels:
            continue
        r, c, cropped = crop_to_content(mask)
        instances.append(SceneInstance(row_off + r, col_off + c, cropped.copy(), float(score), tuple(window), tile,
                                       modalities=modalities))
    return instances


@dataclass
class TileDetections:
    """One tile's detections on the host, masks not yet pasted into the tile.

    `masks` is [N, M, M] mask probabilities over each box (a detector called with
    `paste_masks=False`); `valid` is None when every pixel of the tile was valid.
    """

    window: tuple[int, int, int, int]
    tile: int
    scores: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    valid: np.ndarray | None = None
    modalities: tuple[str, ...] = ()  # the inputs the model had on this tile

    def __len__(self) -> int:
        return len(self.scores)

    def valid_pixels(self) -> np.ndarray:
        """[H, W] bool: where the tile's input was valid."""
        return np.ones(self.window[2:], bool) if self.valid is None else self.valid


def tile_instances(detections: TileDetections, mask_threshold: float, min_pixels: int = 4) -> list[SceneInstance]:
    """Paste, threshold and cut one tile's masks: its instances on the scene grid."""
    height, width = detections.window[2:]
    # torchvision's own paste, as the detector's `paste_masks=True` does
    pasted = paste_masks_in_image(torch.from_numpy(detections.masks)[:, None], torch.from_numpy(detections.boxes),
                                  (height, width))[:, 0]
    masks = (pasted >= mask_threshold).numpy()
    return instances_from_tile({"masks": masks, "scores": detections.scores}, detections.window,
                               detections.valid_pixels(), detections.tile, min_pixels=min_pixels,
                               modalities=detections.modalities)
