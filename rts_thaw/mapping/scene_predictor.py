"""Scenes through the model: tiles -> detector -> per-tile detections, handed over scene by scene.

One DataLoader streams the tiles of all scenes in order; as soon as the last tile of a
scene has been through the model, `on_scene_done` receives that scene's tile detections
(the caller pastes, merges and writes them elsewhere while the model goes on). This loop
feeds the accelerator, so it does as little else as it can: masks leave the device at the
heads' resolution and are pasted into their tiles by the scene's finisher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rts_thaw.data.geotiff import SceneSpec, tile_windows
from rts_thaw.data.normalization import NormStats
from rts_thaw.mapping.instances import TileDetections
from rts_thaw.mapping.scene_tiles import SceneTiles, collate_tiles


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
class SceneStats:
    tiles: int = 0
    empty_tiles: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"wait_for_tiles": 0.0, "infer": 0.0})


@dataclass
class _Scene:
    spec: SceneSpec
    remaining: int
    stats: SceneStats
    tiles: list[TileDetections] = field(default_factory=list)


def _loader(dataset: SceneTiles, config: TilingConfig) -> DataLoader:
    workers = config.num_workers if len(dataset) > config.batch_size else 0
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=workers, collate_fn=collate_tiles,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)


@torch.inference_mode()
def predict_scenes(detector: torch.nn.Module, specs: list[SceneSpec], shapes: list[tuple[int, int]],
                   norm_stats: NormStats, config: TilingConfig, device: torch.device,
                   on_scene_done: Callable[[SceneSpec, list[TileDetections], SceneStats], None],
                   progress: bool = True, precision: str | int = "32") -> None:
    """Run every tile of `specs` (scene shapes (height, width)) through the detector and call
    `on_scene_done(spec, detections of each non-empty tile, stats)` once per scene."""
    autocast = inference_autocast(device, precision)
    scenes, tiles = [], []
    for k, (spec, (height, width)) in enumerate(zip(specs, shapes)):
        windows = tile_windows(width, height, config.tile_size, config.stride)
        scenes.append(_Scene(spec, len(windows), SceneStats(tiles=len(windows))))
        tiles += [(k, w) for w in windows]
    dataset = SceneTiles(specs, tiles, list(detector.modalities), norm_stats, detector.optional_modalities)
    bar = tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not progress)
    bar.set_postfix(scenes=f"0/{len(scenes)}")
    finished = 0
    batches = iter(_loader(dataset, config))
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        waited = time.perf_counter() - start
        touched = batch["scene"] + batch["empty_scenes"]
        for k in touched:  # the wait is shared by the scenes in the batch
            scenes[k].stats.seconds["wait_for_tiles"] += waited / len(touched)
        for k in batch["empty_scenes"]:
            scenes[k].stats.empty_tiles += 1
            scenes[k].remaining -= 1
        if batch["scene"]:
            start = time.perf_counter()
            for k, detections in zip(batch["scene"], batch_detections(detector, batch, device, autocast, config,
                                                                      config.score_threshold)):
                scenes[k].tiles.append(detections)
                scenes[k].remaining -= 1
            elapsed = time.perf_counter() - start
            for k in batch["scene"]:
                scenes[k].stats.seconds["infer"] += elapsed / len(batch["scene"])
        bar.update(len(touched))
        for k in sorted(set(touched)):
            if scenes[k].remaining == 0:
                scene = scenes[k]
                on_scene_done(scene.spec, scene.tiles, scene.stats)
                scene.tiles = []
                finished += 1
                bar.set_postfix(scenes=f"{finished}/{len(scenes)}")
    bar.close()


def batch_detections(detector: torch.nn.Module, batch: dict, device: torch.device, autocast, config: TilingConfig,
                     score_threshold: float | None = None) -> list[TileDetections]:
    """The model on one batch of `collate_tiles`: each tile's detections on the host, those scoring
    below `score_threshold` dropped (None keeps what the heads keep). The detector is called with
    `paste_masks=False`; one that pastes its masks anyway (returns `masks`, not `box_masks`) has
    them thresholded at `config.mask_threshold` here."""
    images = {m: x.to(device, non_blocking=True) for m, x in batch["image"].items()}
    available = {m: has.to(device) for m, has in batch.get("available", {}).items()}
    with autocast:
        outputs = detector(images, batch["image_sizes"], paste_masks=False, available=available or None)
    # one copy per kind for the whole batch, not one per tile: each copy waits for the device
    counts = [len(o["scores"]) for o in outputs]
    scores = torch.cat([o["scores"] for o in outputs]).float().cpu().numpy()
    boxes = torch.cat([o["boxes"].reshape(-1, 4) for o in outputs]).float().cpu().numpy()
    pasted = not all("box_masks" in o for o in outputs)
    if pasted:  # tile-sized masks differ in size between tiles; bool is 4x less to move than float
        masks = [(o["masks"] >= config.mask_threshold).cpu().numpy() for o in outputs]
    else:
        masks = torch.cat([o["box_masks"] for o in outputs]).float().cpu().numpy()
    starts = np.cumsum([0] + counts)
    per_tile = []
    for t, (window, valid, tile) in enumerate(zip(batch["window"], batch["valid"], batch["index"])):
        part = slice(starts[t], starts[t + 1])
        tile_masks = masks[t] if pasted else masks[part]
        keep = slice(None) if score_threshold is None else scores[part] >= score_threshold
        valid = valid[:window[2], :window[3]].numpy()
        used = tuple(m for m in detector.modalities
                     if m in images and (m not in available or bool(batch["available"][m][t])))
        per_tile.append(TileDetections(window, tile, scores[part][keep], boxes[part][keep], tile_masks[keep],
                                       pasted, None if valid.all() else valid.copy(), used))
    return per_tile
