"""GeoAI Arctic Challenge submissions: predict every chip of a split, write and validate the results list.

A chip larger than the model's tile is covered by overlapping tiles and its instances
merged across the seams, exactly as a scene is; the merged masks are then encoded at
the chip's full H x W.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from tqdm import tqdm

from rts_thaw.core.classes import RTS_CATEGORY
from rts_thaw.core.rle import mask_to_rle
from rts_thaw.data.geotiff import tile_windows
from rts_thaw.eval.submission import validate_submission, write_submission
from rts_thaw.mapping.instances import SceneInstance, tile_instances
from rts_thaw.mapping.map_scenes import set_detection_limits
from rts_thaw.mapping.scene_predictor import TilingConfig, batch_detections, inference_autocast
from rts_thaw.mapping.scene_tiles import collate_tiles, window_tuple
from rts_thaw.mapping.seam_merge import merge_across_seams


def challenge_dataset(data_cfg: DictConfig, model, split: str):
    """The split's chips, read with the checkpoint's modalities and normalisation."""
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    with open_dict(data_cfg):
        data_cfg.modalities = list(model.detector.modalities)
        data_cfg.tile_size = model.tile_size
    datamodule = instantiate(data_cfg)
    datamodule.set_norm_stats(model.norm_stats)
    return datamodule.dataset(split, augment=False)


def _tiles(dataset, tiling: TilingConfig) -> Iterator[dict]:
    """Every tile of every chip, in chip order, with the chip's id and size."""
    loader = DataLoader(dataset, batch_size=None, num_workers=tiling.num_workers)
    for sample in loader:
        image_id, (h, w) = int(sample["meta"]["image_id"]), tuple(sample["valid"].shape)
        windows = tile_windows(w, h, tiling.tile_size, tiling.stride)
        for k, window in enumerate(windows):
            r, c, th, tw = window_tuple(window)
            valid = sample["valid"][r:r + th, c:c + tw]
            # the chip's id is the tile's "scene" for collate_tiles; tiles of one chip get distinct
            # indices, so only cross-tile duplicates merge
            yield {"scene": image_id, "chip_size": (h, w), "last": k == len(windows) - 1,
                   "index": k, "window": (r, c, th, tw), "valid": valid,
                   "image": {m: x[:, r:r + th, c:c + tw] for m, x in sample["image"].items()}}


def _chip_results(image_id: int, size: tuple[int, int], instances: list[SceneInstance],
                  min_shared_iou: float) -> list[dict]:
    results = []
    for inst in merge_across_seams(instances, min_shared_iou):
        mask = np.zeros(size, dtype=bool)
        r0, c0, r1, c1 = inst.bounds
        mask[r0:r1, c0:c1] = inst.mask
        results.append({"image_id": image_id, "category_id": RTS_CATEGORY["id"],
                        "segmentation": mask_to_rle(mask), "score": float(min(max(inst.score, 0.0), 1.0))})
    return results


@torch.inference_mode()
def predict_chips(model, dataset, device: torch.device, tiling: TilingConfig, progress: bool = True,
                  precision: str | int = "32") -> list[dict]:
    """COCO results for every chip: every detection the model's heads keep (`tiling`'s
    tile size, overlap, batch size, reading workers and mask threshold apply)."""
    autocast = inference_autocast(device, precision)
    results: list[dict] = []
    pending: list[dict] = []
    per_chip: dict[int, list[SceneInstance]] = {}
    finished: list[tuple[int, tuple[int, int]]] = []

    def run(batch_tiles: list[dict]) -> None:
        batch = collate_tiles(batch_tiles)
        for chip, tile in zip(batch["scene"], batch_detections(model.detector, batch, device, autocast, tiling)):
            per_chip.setdefault(chip, []).extend(tile_instances(tile, tiling.mask_threshold, tiling.min_pixels))

    bar = tqdm(total=len(dataset), desc="chips", unit="chip", disable=not progress)
    for tile in _tiles(dataset, tiling):
        pending.append(tile)
        if tile["last"]:
            finished.append((tile["scene"], tile["chip_size"]))
        if len(pending) == tiling.batch_size:
            run(pending)
            pending = []
            for image_id, size in finished:
                results += _chip_results(image_id, size, per_chip.pop(image_id, []), tiling.min_shared_iou)
                bar.update()
            finished = []
    if pending:
        run(pending)
    for image_id, size in finished:
        results += _chip_results(image_id, size, per_chip.pop(image_id, []), tiling.min_shared_iou)
        bar.update()
    bar.close()
    return results


def predict_challenge(model, data_cfg: DictConfig, split: str, output: str | Path, device: torch.device,
                      tiling: TilingConfig, score_threshold: float | None = None, progress: bool = True,
                      precision: str | int = "32") -> tuple[Path, list[str]]:
    """Write the submission for `split` and return its path and the validator's problems (none expected).

    `score_threshold` None keeps the heads' own threshold: AP rewards low-score detections
    ranked below the confident ones, so a mapping threshold is usually too strict here.
    """
    set_detection_limits(model.detector, score_threshold, proposals=tiling.proposals)
    dataset = challenge_dataset(data_cfg, model, split)
    results = predict_chips(model, dataset, device, tiling, progress=progress, precision=precision)
    path = write_submission(results, output)
    return path, validate_submission(path, dataset.chip_sizes())
