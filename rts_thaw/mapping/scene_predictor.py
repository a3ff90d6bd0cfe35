"""One scene through the model: tiles -> detector -> per-tile instances -> merged across seams."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rts_thaw.data.geotiff import SceneSpec, tile_windows
from rts_thaw.data.normalization import NormStats
from rts_thaw.mapping.instances import SceneInstance, instances_from_tile
from rts_thaw.mapping.scene_tiles import SceneTiles, collate_tiles
from rts_thaw.mapping.seam_merge import merge_across_seams


@dataclass
class TilingConfig:
    tile_size: int
    overlap: int = 64
    batch_size: int = 4
    num_workers: int = 2
    mask_threshold: float = 0.5
    score_threshold: float = 0.3
    max_detections: int = 100
    min_pixels: int = 4
    min_shared_iou: float = 0.3

    @property
    def stride(self) -> int:
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap={self.overlap} must be in [0, tile_size={self.tile_size})")
        return self.tile_size - self.overlap


@dataclass
class SceneStats:
    tiles: int = 0
    empty_tiles: int = 0
    raw_instances: int = 0
    instances: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"infer": 0.0, "merge": 0.0})


def _loader(dataset: SceneTiles, config: TilingConfig) -> DataLoader:
    workers = config.num_workers if len(dataset) > config.batch_size else 0
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=workers, collate_fn=collate_tiles,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if workers else None)


@torch.inference_mode()
def predict_scene(detector: torch.nn.Module, spec: SceneSpec, reader_shape: tuple[int, int], norm_stats: NormStats,
                  config: TilingConfig, device: torch.device, on_tile=None, progress: bool = True
                  ) -> tuple[list[SceneInstance], SceneStats]:
    """Instances of one scene on its reference grid.

    `reader_shape` is the scene's (height, width); `on_tile(window, valid)` is called
    for every tile that was read and not empty (the score raster marks valid pixels).
    """
    height, width = reader_shape
    windows = tile_windows(width, height, config.tile_size, config.stride)
    dataset = SceneTiles(spec, list(detector.modalities), windows, norm_stats)
    stats = SceneStats(tiles=len(windows))
    tile_instances: list[SceneInstance] = []
    bar = tqdm(total=len(windows), desc=f"{spec.id} tiles", unit="tile", disable=not progress, leave=False)
    for batch in _loader(dataset, config):
        stats.empty_tiles += batch["n_empty"]
        if batch["index"]:
            start = time.perf_counter()
            images = {m: x.to(device, non_blocking=True) for m, x in batch["image"].items()}
            outputs = detector(images, batch["image_sizes"])
            for index, window, valid, output in zip(batch["index"], batch["window"], batch["valid"], outputs):
                keep = output["scores"] >= config.score_threshold
                # threshold on the device: bool masks are 4x smaller to move than float ones
                output = {"scores": output["scores"][keep].cpu(),
                          "masks": (output["masks"][keep] >= config.mask_threshold).cpu()}
                tile_instances += instances_from_tile(output, window, valid.numpy(), index,
                                                      mask_threshold=0.5, min_pixels=config.min_pixels)
                if on_tile is not None:
                    on_tile(window, valid.numpy())
            stats.seconds["infer"] += time.perf_counter() - start
        bar.update(len(batch["index"]) + batch["n_empty"])
    bar.close()
    start = time.perf_counter()
    merged = merge_across_seams(tile_instances, config.min_shared_iou)
    stats.seconds["merge"] += time.perf_counter() - start
    stats.raw_instances, stats.instances = len(tile_instances), len(merged)
    return merged, stats
