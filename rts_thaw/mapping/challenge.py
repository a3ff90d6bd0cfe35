"""Chips through the prediction engine into a COCO results file (a challenge submission).

A chip larger than the model's tile is covered by overlapping tiles and its instances
merged across the seams, exactly as a scene is (`chip_tiling`, the path evaluation
shares); the merged masks are then encoded at the chip's full H x W. Any chip source
works (`arctic_challenge`, `coco_chips`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.eval.coco import coco_result
from rts_thaw.eval.submission import validate_submission, write_submission
from rts_thaw.mapping.chip_tiling import predict_whole_chips
from rts_thaw.mapping.engine import TilingConfig
from rts_thaw.mapping.instances import SceneInstance
from rts_thaw.mapping.map_scenes import set_detection_limits


def chip_dataset(data_cfg: DictConfig, model, split: str):
    """The split's chips, whole (no training crops), read with the checkpoint's modalities and normalisation."""
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
        r0, c0, r1, c1 = inst.bounds
        box = (c0, r0, c1 - c0, r1 - r0)
        results.append(coco_result(image_id, inst.full_mask(size), box, min(max(inst.score, 0.0), 1.0)))
    return results


def predict_chips(model, dataset, device: torch.device, tiling: TilingConfig, progress: bool = True,
                  precision: str | int = "32") -> list[dict]:
    """COCO results for every chip: every detection the model's heads keep (`tiling`'s
    tile size, overlap, batch size, reading workers and mask threshold apply)."""
    image_ids = [int(record["id"]) for record in dataset.images]
    results: list[dict] = []

    def add_results(chip: int, merged: list[SceneInstance]) -> None:
        _, height, width = dataset.sizes[chip]
        results.extend(chip_results(image_ids[chip], (height, width), merged))

    predict_whole_chips(model.detector, dataset, tiling, device, add_results, progress=progress, precision=precision)
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
