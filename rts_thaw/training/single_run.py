"""One training run from a composed config: build, fit (resuming), test, write results.

Used by `rts_thaw.train` for a plain run and by the staged pipeline for each stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.json_files import write_json_atomic
from rts_thaw.training.callbacks import LastCheckpointOnInterrupt, PredictionImages, RunStats
from rts_thaw.training.module import DetectionModule

log = logging.getLogger(__name__)

# Settings that do not change what a run computes; left out of the config key.
VOLATILE_KEYS = ("logger", "paths", "hydra")
VOLATILE_TRAINER_KEYS = ("accelerator", "devices", "enable_progress_bar", "default_root_dir",
                         "log_every_n_steps", "num_nodes", "strategy")


def config_key(cfg: DictConfig | dict, length: int = 12) -> str:
    """A short stable hash of a config (plain containers, sorted keys)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_key(cfg: DictConfig) -> str:
    """The hash of everything in a run's config that affects its result."""
    container = OmegaConf.to_container(cfg, resolve=False)
    for key in VOLATILE_KEYS:
        container.pop(key, None)
    container.get("training", {}).pop("resume", None)
    for key in VOLATILE_TRAINER_KEYS:
        container.get("trainer", {}).pop(key, None)
    return config_key(container)


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain containers, every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True)


def build_datamodule(cfg: DictConfig):
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return datamodule


def build_detector(cfg: DictConfig, datamodule) -> torch.nn.Module:
    """The detector of `cfg.model` for the datamodule's modalities (the entry point has checked the tile size)."""
    return instantiate(cfg.model)(modality_channels=dict(datamodule.modality_channels))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        if "WandbLogger" in logger_cfg._target_:
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


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def checkpoint_run_info(path: Path) -> dict[str, Any]:
    """The rts_thaw run information a checkpoint stores ({} if none); raises what torch.load raises."""
    # Only the metadata is needed: map the file instead of reading every tensor.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return checkpoint.get("rts_thaw", {}) if isinstance(checkpoint, dict) else {}


def check_resumable(path: Path, key: str) -> None:
    """Refuse to resume from a checkpoint that another configuration wrote."""
    try:
        info = checkpoint_run_info(path)
    except Exception as error:
        raise RuntimeError(
            f"cannot resume: {path} is unreadable ({error}); delete it or pass training.resume=false"
        ) from error
    stored = info.get("run_key")
    if stored != key:
        raise RuntimeError(
            f"cannot resume: {path} was written by another configuration (key {stored}, this run "
            f"{key}); use another run directory (hydra.run.dir=...) or pass training.resume=false"
        )


def fit_and_test(
    cfg: DictConfig,
    run_dir: str | Path,
    datamodule=None,
    detector: torch.nn.Module | None = None,
    extra_info: dict | None = None,
) -> dict[str, Any]:
    """Train the run of `cfg` in `run_dir`, test its best checkpoint and write `results.json`.

    Re-running with the same config in the same directory resumes from
    `checkpoints/last.ckpt` (unless training.resume is false). Returns the results:
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

    key = run_key(cfg)
    run_info = {
        "norm_stats": datamodule.norm_stats.to_dict(),
        "modalities": list(datamodule.modality_channels),
        "modality_channels": dict(datamodule.modality_channels),
        "tile_size": int(cfg.data.tile_size),
        "config": resolved_config(cfg),
        "run_key": key,
        **(extra_info or {}),
    }
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)
    module = DetectionModule(
        detector,
        optimizer=OmegaConf.to_container(cfg.training.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.training.scheduler, resolve=True),
        coco_preset=cfg.training.coco_preset,
        run_info=run_info,
        modality_dropout=float(cfg.training.get("modality_dropout") or 0.0),
    )

    ckpt_dir = run_dir / "checkpoints"
    checkpointing = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=cfg.training.monitor, mode="max",
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )
    # A separate callback: save_last=True skips epochs whose metric did not improve.
    last_checkpointing = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
    )
    stats = RunStats()
    callbacks = [
        checkpointing,
        last_checkpointing,
        # Ctrl-C (or any crash) still leaves a last.ckpt to continue from.
        LastCheckpointOnInterrupt(ckpt_dir),
        stats,
        PredictionImages(max_images=int(cfg.training.log_images)),
    ]
    loggers = build_loggers(cfg, run_dir)
    for logger in loggers:
        logger.log_hyperparams(run_info["config"])
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir)
    )

    resume_from = last_checkpoint(run_dir) if cfg.training.get("resume", True) else None
    if resume_from is not None:
        check_resumable(resume_from, key)
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if not (ckpt_dir / "last.ckpt").is_file():  # fast_dev_run saves nothing by itself
        trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))

    best = checkpointing.best_model_path
    test_from = best if best and Path(best).is_file() else None
    trainer.test(module, datamodule=datamodule, ckpt_path=test_from, verbose=False)

    results = {
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
    write_json_atomic(run_dir / "results.json", results, sort_keys=True)
    return results
