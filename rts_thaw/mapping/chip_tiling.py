"""Chips larger than the model's tile, seen whole: each is covered by overlapping tiles that go
through the prediction engine, and its instances are merged across the seams, exactly as a
scene's are. The one path for such chips: `predict` writes their COCO results (`challenge`),
and the validation and test metrics of training and `evaluate` score them (`training.module`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rts_thaw.core.classes import RTS_LABEL
from rts_thaw.mapping.engine import TilingConfig, predict_tiles
from rts_thaw.mapping.instances import SceneInstance, tile_instances
from rts_thaw.mapping.seam_merge import merge_across_seams
from rts_thaw.mapping.tile_sources import ChipTiles


def predict_whole_chips(detector: torch.nn.Module, chips, tiling: TilingConfig, device: torch.device,
                        on_chip: Callable[[int, list[SceneInstance]], None], progress: bool = False,
                        precision: str | int = "32") -> None:
    """Call `on_chip(k, instances)` with the merged instances of each chip k of `chips` (a chip
    dataset, or `LoadedChips`), on chip grid coordinates, as soon as its last tile is through."""
    source = ChipTiles(chips, tiling.tile_size, tiling.stride)

    def merge(chip: int, tiles, stats) -> None:  # the engine's sink: a chip's tiles are all through
        instances = [i for tile in tiles for i in tile_instances(tile, tiling.mask_threshold, tiling.min_pixels)]
        on_chip(chip, merge_across_seams(instances, tiling.min_shared_iou))

    predict_tiles(detector, source, tiling, device, merge, progress=progress, precision=precision, unit="chips")


class LoadedChips:
    """Chips already in memory (an evaluation batch's), read as `ChipTiles` reads a chip dataset:
    `sizes` and samples with normalised `image` {modality: [C,H,W]} and `valid` [H,W] on the CPU."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.sizes = [("", *sample["valid"].shape) for sample in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def as_detector_output(instances: list[SceneInstance], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A chip's merged instances in the detector's eval output format (boxes xyxy px, scores, labels,
    masks [N,1,H,W] at the chip's size), boxes holding each mask tightly."""
    masks = np.zeros((len(instances), 1, *size), dtype=np.float32)
    boxes = np.zeros((len(instances), 4), dtype=np.float32)
    for k, inst in enumerate(instances):
        masks[k, 0] = inst.full_mask(size)
        r0, c0, r1, c1 = inst.bounds
        boxes[k] = (c0, r0, c1, r1)
    return {"boxes": torch.from_numpy(boxes), "masks": torch.from_numpy(masks),
            "scores": torch.tensor([inst.score for inst in instances], dtype=torch.float32),
            "labels": torch.full((len(instances),), RTS_LABEL, dtype=torch.int64)}


def whole_chip_outputs(detector: torch.nn.Module, samples: list[dict], tiling: TilingConfig, device: torch.device,
                       precision: str | int = "32") -> list[dict[str, torch.Tensor]]:
    """The detector's outputs for chips larger than its tile (`samples` as in `LoadedChips`),
    each chip tiled and merged through the engine."""
    chips = LoadedChips(samples)
    outputs: list[dict | None] = [None] * len(chips)

    def keep(chip: int, instances: list[SceneInstance]) -> None:
        outputs[chip] = as_detector_output(instances, chips.sizes[chip][1:])

    predict_whole_chips(detector, chips, tiling, device, keep, precision=precision)
    return outputs
