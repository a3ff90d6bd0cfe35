"""One training run from a composed config: build, fit (resuming), test, write results.

Used by `rts_thaw.train` for a plain run and by the staged pipeline for each stage.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.core.checkpoints import read_checkpoint
from rts_thaw.core.json_files import write_json_atomic
from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY
from rts_thaw.models.detector import trained_with_modality_dropout
from rts_thaw.models.speed import apply_speed
from rts_thaw.training.callbacks import RunIdentityCheck, RunStats
from rts_thaw.training.module import DetectionModule
from rts_thaw.training.ranks import is_global_zero
from rts_thaw.training.run_identity import config_key, run_key

log = logging.getLogger(__name__)

def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain containers, every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True)


def build_datamodule(cfg: DictConfig):
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return datamodule


def build_detector(cfg: DictConfig, datamodule) -> torch.nn.Module:
    """The detector of `cfg.model` for the datamodule's modalities (the entry point has checked the tile size)."""
    return instantiate(cfg.model)(modality_channels=dict(datamodule.modality_channels),
                                  learned_missing=trained_with_modality_dropout(cfg))


def build_callbacks(cfg: DictConfig) -> dict[str, pl.Callback]:
    """The `callbacks` config group, by name; the run reads its results from the required ones."""
    callbacks = {name: instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    required = {"best_checkpoint": ModelCheckpoint, "last_checkpoint": ModelCheckpoint, "run_stats": RunStats}
    for name, kind in required.items():
        if not isinstance(callbacks.get(name), kind):
            raise ValueError(f"callbacks.{name} must be a {kind.__name__} (conf/callbacks/default.yaml); "
                             f"got {type(callbacks.get(name)).__name__}")
    return callbacks


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        if issubclass(get_class(logger_cfg._target_), WandbLogger):
            loggers.append(_wandb_logger(logger_cfg, run_dir))
        else:
            loggers.append(instantiate(logger_cfg, save_dir=str(run_dir)))
    return loggers


def _wandb_logger(logger_cfg: DictConfig, run_dir: Path) -> WandbLogger:
    """A W&B logger that never prompts: offline (and says so) when no API key is found."""
    offline = bool(logger_cfg.get("offline")) or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    if not offline and not _wandb_api_key_available():
        log.warning(
            "W&B: no API key (WANDB_API_KEY or ~/.netrc) found, logging offline to %s/wandb; "
            "upload later with `wandb sync`.", run_dir
        )
        offline = True
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    # The run id is the run directory's, so a resumed run continues the same W&B run.
    run_id = config_key({"dir": str(run_dir.resolve())}, length=16)
    return instantiate(logger_cfg, save_dir=str(run_dir), offline=offline, id=run_id,
                       resume="allow")


def _wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resumed_step(path: Path) -> int:
    """The step a run resumes from; an unreadable `last.ckpt` (a disk full mid-write) is named,
    with the way out."""
    try:
        return int(read_checkpoint(path, metadata_only=True).get("global_step", 0))
    except ValueError as error:
        raise RuntimeError(f"cannot resume: {error}; delete it or pass training.resume=false") from error


def csv_history(loggers: list, up_to_step: int) -> dict[int, list[dict]]:
    """The rows a resumed run's CSV loggers wrote up to its checkpoint. Lightning's CSV logger
    starts its file afresh, so they are read before it does and logged again (`restore_history`);
    rows after the checkpoint are left out: the resumed run logs those steps anew."""
    history = {}
    for k, logger in enumerate(loggers):
        path = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
        if path is not None and path.is_file():
            with open(path, newline="") as handle:
                rows = [{key: _number(value) for key, value in row.items() if value != ""}
                        for row in csv.DictReader(handle)]
            history[k] = [row for row in rows if row.get("step", 0) <= up_to_step]
    return history


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def restore_history(loggers: list, history: dict[int, list[dict]]) -> None:
    for k, rows in history.items():
        loggers[k].experiment.metrics.extend(rows)  # written with the next rows, before them


def fit_and_test(
    cfg: DictConfig,
    run_dir: str | Path,
    datamodule=None,
    detector: torch.nn.Module | None = None,
    extra_info: dict | None = None,
    identity: str | None = None,
) -> dict[str, Any]:
    """Train the run of `cfg` in `run_dir`, test its best checkpoint and write `results.json`
(scores in percent, marked by its `score_unit`).

    Re-running with the same config in the same directory resumes from
    `checkpoints/last.ckpt` (unless training.resume is false); `identity` replaces the config's
    run key as what a resumed checkpoint must match (a cache entry's own key). Returns the results:
    test metrics, parameter counts, images/s, peak memory, wall time, checkpoint paths.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)  # this run's directory, inside or outside Hydra
    start = time.perf_counter()
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = datamodule if datamodule is not None else build_datamodule(cfg)
    if detector is None:
        detector = build_detector(cfg, datamodule)
    speed = cfg.training.speed
    apply_speed(detector, speed.channels_last, speed.compile, speed.compile_options)

    key = identity or run_key(cfg)
    run_info = {
        "norm_stats": datamodule.norm_stats.to_dict(),
        "modalities": list(datamodule.modality_channels),
        "modality_channels": dict(datamodule.modality_channels),
        "tile_size": int(cfg.data.tile_size),
        "config": resolved_config(cfg),
        "run_key": key,
        # a resumed run must have logged (and picked its best checkpoint by) scores in this unit too
        SCORE_UNIT_KEY: SCORE_UNIT,
        **(extra_info or {}),
    }
    if is_global_zero():  # every rank of a multi-process run gets here; one writes
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)
    module = DetectionModule(
        detector,
        optimizer={**OmegaConf.to_container(cfg.training.optimizer, resolve=True), "fused": speed.fused_optimizer},
        scheduler=OmegaConf.to_container(cfg.training.scheduler, resolve=True),
        coco_preset=cfg.training.coco_preset,
        run_info=run_info,
        modality_dropout=float(cfg.training.get("modality_dropout") or 0.0),
        chip_overlap=cfg.training.get("chip_overlap"),
    )

    ckpt_dir = run_dir / "checkpoints"
    callbacks = build_callbacks(cfg)
    checkpointing, stats = callbacks["best_checkpoint"], callbacks["run_stats"]
    resume = bool(cfg.training.get("resume", True)) and (ckpt_dir / "last.ckpt").is_file()
    start_step = resumed_step(ckpt_dir / "last.ckpt") if resume else 0
    loggers = build_loggers(cfg, run_dir)
    history = csv_history(loggers, start_step) if resume else {}
    for logger in loggers:
        logger.log_hyperparams(run_info["config"])
    restore_history(loggers, history)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks.values(), RunIdentityCheck(key)], logger=loggers or False,
        default_root_dir=str(run_dir)
    )

    with warnings.catch_warnings():  # a first run has no last checkpoint yet: nothing to warn about
        warnings.filterwarnings("ignore", message=r".*ckpt_path=\"last\"\) is set, but there is no last checkpoint")
        # Resuming within an epoch: the data module restores the shuffle position itself
        # (rts_thaw.data.sampling), which Lightning's check of the loader cannot see.
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path="last" if cfg.training.get("resume", True) else None)
    if not (ckpt_dir / "last.ckpt").is_file():  # fast_dev_run saves nothing by itself
        trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))

    best = checkpointing.best_model_path
    test_from = best if best and Path(best).is_file() else None
    trainer.test(module, datamodule=datamodule, ckpt_path=test_from, verbose=False)

    results = {
        SCORE_UNIT_KEY: SCORE_UNIT,  # of "test"; readers refuse or convert files without it (older code: fractions)
        "test": module.test_metrics,
        **stats.stats,
        "perf/wall_s": time.perf_counter() - start,
        "global_step": trainer.global_step,
        "best_checkpoint": str(test_from) if test_from else None,
        "last_checkpoint": str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").is_file() else None,
        "modalities": run_info["modalities"],
        "run_key": key,
        "run_dir": str(run_dir),
    }
    for logger in loggers:
        logger.log_metrics({"perf/wall_s": results["perf/wall_s"]}, step=trainer.global_step)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next run of this process gets its own W&B run
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "results.json", results, sort_keys=True)
    return results
