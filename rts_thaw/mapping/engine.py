"""The prediction engine: tiles from a source -> the detector in batches -> each group's
detections, handed to a sink as soon as the group's last tile is through.

A source (`tile_sources`: GeoTIFF scenes, chips) lists its tiles group by group, a group
being one scene or one chip. One DataLoader streams them in order; `on_group_done` (the
sink: scene files in `map_scenes`, COCO results in `challenge`) receives a group's tile
detections and pastes, merges and writes them while the model goes on. This loop feeds
the accelerator, so it does as little else as it can: masks leave the device at the
heads' resolution and are pasted into their tiles by the sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rts_thaw.mapping.instances import TileDetections
from rts_thaw.mapping.tile_sources import TileSource, collate_tiles


@dataclass
class TilingConfig:
    tile_size: int
    overlap: int = 64
    batch_size: int = 4
    num_workers: int = 2
    write_workers: int | None = None  # None: by device (`writer_count`)
    mask_threshold: float = 0.5
    score_threshold: float = 0.3
    max_detections: int = 100
    min_pixels: int = 4
    min_shared_iou: float = 0.3
    proposals: int | None = None  # RPN proposals per tile through the RoI heads; None: the checkpoint's

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"tiling.overlap={self.overlap} must be at least 0 and smaller than the tile size "
                             f"{self.tile_size}")
        if self.proposals is not None and self.proposals < 1:
            raise ValueError(f"tiling.proposals={self.proposals} must be a positive count, or null for the "
                             f"checkpoint's own")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    def writer_count(self, device: torch.device) -> int:
        """Writer processes finishing scenes (0: one thread). By default 2 when the model runs on
        an accelerator, whose feeding loop must keep the interpreter lock; none on the CPU, where
        the model already keeps every core busy: processes there only compete with it, after
        seconds of importing torch and GDAL (2 cores: 51% of the forward rate against 69% with
        a thread, docs/benchmarks.md)."""
        if self.write_workers is not None:
            return self.write_workers
        return 0 if device.type == "cpu" else 2


PRECISIONS = ("32", "bf16-mixed")


def check_precision(precision: str | int) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported for prediction; use one of {list(PRECISIONS)}")
    return precision


def inference_autocast(device: torch.device, precision: str | int = "32"):
    """The model's forward in float32 ("32") or autocast to bfloat16 ("bf16-mixed", as
    Lightning names it; on a GPU the heads' convolutions and products run on bf16 units)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16-mixed")


@dataclass
class GroupStats:
    """What the engine knows of one group (a scene or a chip) when it hands it over."""

    tiles: int = 0
    empty_tiles: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"wait_for_tiles": 0.0, "infer": 0.0})


@dataclass
class _Group:
    remaining: int
    stats: GroupStats
    tiles: list[TileDetections] = field(default_factory=list)


def _loader(source: Dataset, config: TilingConfig) -> DataLoader:
    workers = config.num_workers if len(source) > config.batch_size else 0
    return DataLoader(source, batch_size=config.batch_size, num_workers=workers, collate_fn=collate_tiles,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)


@torch.inference_mode()
def predict_tiles(detector: torch.nn.Module, source: TileSource, config: TilingConfig, device: torch.device,
                  on_group_done: Callable[[int, list[TileDetections], GroupStats], None],
                  score_threshold: float | None = None, progress: bool = True, precision: str | int = "32",
                  unit: str = "scenes") -> None:
    """Run every tile of `source` through the detector and call `on_group_done(group, detections
    of each non-empty tile, stats)` once per group, as soon as its last tile is through.
    Detections scoring below `score_threshold` are dropped (None keeps what the heads keep)."""
    autocast = inference_autocast(device, precision)
    groups = [_Group(n, GroupStats(tiles=n)) for n in source.tiles_per_group()]
    bar = tqdm(total=len(source), desc="tiles", unit="tile", disable=not progress)
    bar.set_postfix({unit: f"0/{len(groups)}"})
    finished = 0
    batches = iter(_loader(source, config))
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        waited = time.perf_counter() - start
        touched = batch["group"] + batch["empty_groups"]
        for k in touched:  # the wait is shared by the groups in the batch
            groups[k].stats.seconds["wait_for_tiles"] += waited / len(touched)
        for k in batch["empty_groups"]:
            groups[k].stats.empty_tiles += 1
            groups[k].remaining -= 1
        if batch["group"]:
            start = time.perf_counter()
            for k, detections in zip(batch["group"], batch_detections(detector, batch, device, autocast, config,
                                                                      score_threshold)):
                groups[k].tiles.append(detections)
                groups[k].remaining -= 1
            elapsed = time.perf_counter() - start
            for k in batch["group"]:
                groups[k].stats.seconds["infer"] += elapsed / len(batch["group"])
        bar.update(len(touched))
        for k in sorted(set(touched)):
            if groups[k].remaining == 0:
                group = groups[k]
                on_group_done(k, group.tiles, group.stats)
                group.tiles = []
                finished += 1
                bar.set_postfix({unit: f"{finished}/{len(groups)}"})
    bar.close()


def batch_detections(detector: torch.nn.Module, batch: dict, device: torch.device, autocast, config: TilingConfig,
                     score_threshold: float | None = None) -> list[TileDetections]:
    """The model on one batch of `collate_tiles`: each tile's detections on the host, those scoring
    below `score_threshold` dropped (None keeps what the heads keep). The detector is called with
    `paste_masks=False` and returns each mask over its box (`box_masks`), pasted by the sink."""
    images = {m: x.to(device, non_blocking=True) for m, x in batch["image"].items()}
    available = {m: has.to(device) for m, has in batch.get("available", {}).items()}
    with autocast:
        outputs = detector(images, batch["image_sizes"], paste_masks=False, available=available or None)
    # one copy per kind for the whole batch, not one per tile: each copy waits for the device
    counts = [len(o["scores"]) for o in outputs]
    scores = torch.cat([o["scores"] for o in outputs]).float().cpu().numpy()
    boxes = torch.cat([o["boxes"].reshape(-1, 4) for o in outputs]).float().cpu().numpy()
    masks = torch.cat([o["box_masks"] for o in outputs]).float().cpu().numpy()
    starts = np.cumsum([0] + counts)
    per_tile = []
    for t, (window, valid, tile) in enumerate(zip(batch["window"], batch["valid"], batch["index"])):
        part = slice(starts[t], starts[t + 1])
        keep = slice(None) if score_threshold is None else scores[part] >= score_threshold
        valid = valid[:window[2], :window[3]].numpy()
        used = tuple(m for m in detector.modalities
                     if m in images and (m not in available or bool(batch["available"][m][t])))
        per_tile.append(TileDetections(window, tile, scores[part][keep], boxes[part][keep], masks[part][keep],
                                       None if valid.all() else valid.copy(), used))
    return per_tile
