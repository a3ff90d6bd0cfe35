"""Chips through the prediction engine into a COCO results file (a challenge submission).

A chip larger than the model's tile is covered by overlapping tiles and its instances
merged across the seams, exactly as a scene is; the merged masks are then encoded at
the chip's full H x W. Any chip source works (`arctic_challenge`, `coco_chips`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.eval.coco import coco_result
from rts_thaw.eval.submission import validate_submission, write_submission
from rts_thaw.mapping.engine import TilingConfig, predict_tiles
from rts_thaw.mapping.instances import SceneInstance, tile_instances
from rts_thaw.mapping.map_scenes import set_detection_limits
from rts_thaw.mapping.seam_merge import merge_across_seams
from rts_thaw.mapping.tile_sources import ChipTiles


def chip_dataset(data_cfg: DictConfig, model, split: str):
    """The split's chips, read with the checkpoint's modalities and normalisation."""
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    with open_dict(data_cfg):
        data_cfg.modalities = list(model.detector.modalities)
        data_cfg.tile_size = model.tile_size
    datamodule = instantiate(data_cfg)
    datamodule.set_norm_stats(model.norm_stats)
    return datamodule.dataset(split, augment=False)


def chip_results(image_id: int, size: tuple[int, int], instances: list[SceneInstance]) -> list[dict]:
    """COCO results of one chip's (merged) instances: masks at the chip's full size, and boxes
    (x, y, width, height) that hold each mask tightly, as instances are cut to their content."""
    results = []
    for inst in instances:
        mask = np.zeros(size, dtype=bool)
        r0, c0, r1, c1 = inst.bounds
        mask[r0:r1, c0:c1] = inst.mask
        box = (c0, r0, c1 - c0, r1 - r0)
        results.append(coco_result(image_id, mask, box, min(max(inst.score, 0.0), 1.0)))
    return results


def predict_chips(model, dataset, device: torch.device, tiling: TilingConfig, progress: bool = True,
                  precision: str | int = "32") -> list[dict]:
    """COCO results for every chip: every detection the model's heads keep (`tiling`'s
    tile size, overlap, batch size, reading workers and mask threshold apply)."""
    source = ChipTiles(dataset, tiling.tile_size, tiling.stride)
    image_ids = [int(record["id"]) for record in dataset.images]
    results: list[dict] = []

    def add_results(chip: int, tiles, stats) -> None:  # the sink: a chip's tiles are all through
        instances = [i for tile in tiles for i in tile_instances(tile, tiling.mask_threshold, tiling.min_pixels)]
        merged = merge_across_seams(instances, tiling.min_shared_iou)
        results.extend(chip_results(image_ids[chip], source.sizes[chip], merged))

    predict_tiles(model.detector, source, tiling, device, add_results, progress=progress, precision=precision,
                  unit="chips")
    return results


def predict_challenge(model, data_cfg: DictConfig, split: str, output: str | Path, device: torch.device,
                      tiling: TilingConfig, score_threshold: float | None = None, progress: bool = True,
                      precision: str | int = "32") -> tuple[Path, list[str]]:
    """Write the results file for `split` and return its path and the validator's problems (none expected).

    `score_threshold` None keeps the heads' own threshold: AP rewards low-score detections
    ranked below the confident ones, so a mapping threshold is usually too strict here.
    """
    set_detection_limits(model.detector, score_threshold, proposals=tiling.proposals)
    dataset = chip_dataset(data_cfg, model, split)
    results = predict_chips(model, dataset, device, tiling, progress=progress, precision=precision)
    path = write_submission(results, output)
    return path, validate_submission(path, dataset.chip_sizes())
