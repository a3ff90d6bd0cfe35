"""Evaluate a checkpoint on a dataset split with the COCO metrics of training."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.core.checkpoints import load_checkpoint
from rts_thaw.models.checkpoint import detector_from_checkpoint
from rts_thaw.training.module import DetectionModule

_ABSENT = object()


def data_config_for(info: dict[str, Any], data_cfg: DictConfig | None,
                    missing: list[str] | tuple[str, ...] = (),
                    overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The data config to evaluate a checkpoint on (`info`: its run information): the given one
    (or the training one), changed by the dotted `overrides` (`path.seed=1`: another world of the
    same kind), with the checkpoint's modalities (less `missing`) and tile size, so that the
    model gets the inputs it knows."""
    unknown = [m for m in missing if m not in info["modalities"]]
    if unknown:
        raise ValueError(f"missing_modalities {unknown} are not modalities of this checkpoint "
                         f"({info['modalities']})")
    data_cfg = copy.deepcopy(data_cfg) if data_cfg is not None else OmegaConf.create(info["config"]["data"])
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key or key.startswith("data."):
            raise ValueError(f"data override {override!r}: expected key=value with the key inside the data "
                             "config, e.g. path.seed=1")
        if OmegaConf.select(data_cfg, key, default=_ABSENT) is _ABSENT:
            raise ValueError(f"data override {override!r}: the data config has no {key!r}")
        OmegaConf.update(data_cfg, key, OmegaConf.select(OmegaConf.from_dotlist([override]), key), merge=False)
    with open_dict(data_cfg):
        data_cfg.modalities = [m for m in info["modalities"] if m not in missing]
        data_cfg.tile_size = int(info["tile_size"])
    return data_cfg


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data_cfg: DictConfig | None = None,
    split: str = "test",
    preset: str | None = None,
    trainer_kwargs: dict | None = None,
    missing_modalities: list[str] | tuple[str, ...] = (),
    chip_overlap: int | None = None,
    data_overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, float]:
    """COCO box and mask metrics of a checkpoint on `split` (test | val) of a dataset (the
    training one unless `data_cfg`, changed by the dotted `data_overrides`);
    `missing_modalities` are withheld from the model, as if the scenes had no such raster.
    Chips larger than the checkpoint's tile are scored whole, tiled with `chip_overlap` px of
    overlap (None: the run's `training.chip_overlap`) and merged across seams."""
    checkpoint = load_checkpoint(ckpt_path)
    info = checkpoint["rts_thaw"]
    # The training statistics, not ones computed on this dataset: the model knows those.
    datamodule = instantiate(data_config_for(info, data_cfg, list(missing_modalities), list(data_overrides)),
                             norm_stats=info["norm_stats"])
    datamodule.setup()
    preset = preset or info["config"].get("training", {}).get("coco_preset", "coco")
    if chip_overlap is None:
        chip_overlap = info["config"].get("training", {}).get("chip_overlap")
    module = DetectionModule(detector_from_checkpoint(checkpoint), coco_preset=preset, run_info=info,
                             chip_overlap=chip_overlap)
    trainer = pl.Trainer(**{"accelerator": "auto", "devices": 1, "logger": False,
                            "enable_checkpointing": False, **(trainer_kwargs or {})})
    if split == "test":
        loader = datamodule.test_dataloader()
    elif split == "val":
        loader = datamodule.val_dataloader()
    else:
        raise ValueError(f"unknown split {split!r}: expected test or val")
    trainer.test(module, dataloaders=loader, verbose=False)
    return module.test_metrics
