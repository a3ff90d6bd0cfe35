"""Callbacks: the resume check, run statistics (params, throughput, memory, wall time) and
prediction images; conf/callbacks/ lists those of a run."""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger

from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY
from rts_thaw.models.summary import parameter_counts

log = logging.getLogger(__name__)


class RunIdentityCheck(pl.Callback):
    """Refuses to resume from a checkpoint that another configuration wrote: its weights and
    optimiser state would silently continue a different run. Refuses one whose scores were
    fractions (older code) too: its best-checkpoint choice and logged history would be compared
    with, and continued by, scores in percent."""

    def __init__(self, key: str):
        self.key = key

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.state.fn != "fit":  # testing a checkpoint of this run is no resume
            return
        stored = checkpoint.get("rts_thaw", {}).get("run_key")
        if stored != self.key:
            raise RuntimeError(
                f"cannot resume: {trainer.ckpt_path} was written by another configuration (key {stored}, "
                f"this run {self.key}); use another run directory (hydra.run.dir=...) or pass "
                "training.resume=false")
        unit = checkpoint.get("rts_thaw", {}).get(SCORE_UNIT_KEY)
        if unit != SCORE_UNIT:
            raise RuntimeError(
                f"cannot resume: {trainer.ckpt_path} was written by an older rts_thaw that logged scores as "
                f"fractions (0-1), while this one logs them in {SCORE_UNIT}; its best checkpoint and logged "
                "history would mix the two. Start the run afresh: training.resume=false, or another run "
                "directory (hydra.run.dir=...)")
        log.info("resuming from %s", trainer.ckpt_path)


class RunStats(pl.Callback):
    """Measures what every run reports: parameters, training images/s, peak memory, wall time.

    The figures are logged (`params/*`, `perf/*`) and kept in `.stats` for the
    run's final table. Peak memory is the CUDA allocator's peak (MB) when on a GPU.
    """

    def __init__(self):
        self.stats: dict[str, float] = {}
        self._fit_start = None
        self._train_time = 0.0
        self._train_images = 0
        self._batch_start = None

    def on_fit_start(self, trainer, pl_module):
        self._fit_start = time.perf_counter()
        self.stats.update({f"params/{k}": n for k, n in parameter_counts(pl_module.detector).items()})
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(self.stats))
            logger.log_metrics(dict(self.stats), step=trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._batch_start is None:
            return
        self._train_time += time.perf_counter() - self._batch_start
        self._train_images += len(batch["image_sizes"])
        self._batch_start = None

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log_dict(self._perf(pl_module))

    def on_fit_end(self, trainer, pl_module):
        self.stats.update(self._perf(pl_module))
        self.stats["perf/fit_wall_s"] = time.perf_counter() - (self._fit_start or time.perf_counter())

    def _perf(self, pl_module) -> dict[str, float]:
        perf = {"perf/train_images_per_s": self._train_images / max(self._train_time, 1e-9)}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            perf["perf/peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        return perf


class PredictionImages(pl.Callback):
    """Logs the RGB of a few validation tiles with predicted (red) and true (green) outlines.

    Only W&B loggers receive images; other loggers are left alone.
    """

    def __init__(self, max_images: int = 4, score_threshold: float = 0.5):
        self.max_images = max_images
        self.score_threshold = score_threshold

    def on_validation_epoch_end(self, trainer, pl_module):
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers or pl_module.last_val_example is None or trainer.sanity_checking:
            return
        batch, predictions = pl_module.last_val_example
        images = render_predictions(batch, predictions, pl_module.run_info.get("norm_stats"),
                                    self.max_images, self.score_threshold)
        if images:
            for logger in wandb_loggers:
                logger.log_image("val/predictions", images, step=trainer.global_step)


def render_predictions(batch, predictions, norm_stats, max_images=4, score_threshold=0.5):
    """uint8 HxWx3 pictures: the reference modality, true outlines green, predicted red."""
    modality = "rgb" if "rgb" in batch["image"] else next(iter(batch["image"]))
    pictures = []
    for i, (h, w) in enumerate(batch["image_sizes"][:max_images]):
        picture = _display_image(batch["image"][modality][i, :, :h, :w], modality, norm_stats)
        true_masks = batch["targets"][i]["masks"][:, :h, :w].bool()
        pred = predictions[i]
        keep = pred["scores"] >= score_threshold
        pred_masks = pred["masks"][keep]
        if pred_masks.ndim == 4:
            pred_masks = pred_masks[:, 0]
        pred_masks = pred_masks[:, :h, :w] >= 0.5
        picture[_outline(true_masks).cpu().numpy()] = (0, 255, 0)
        picture[_outline(pred_masks).cpu().numpy()] = (255, 0, 0)
        pictures.append(picture)
    return pictures


def _display_image(image: torch.Tensor, modality: str, norm_stats) -> np.ndarray:
    """Undo the normalisation where its statistics are known, then stretch to 0-255."""
    image = image.detach().float().cpu()
    # norm_stats is NormStats.to_dict(): {"mean": {modality: [...]}, "std": {...}}
    norm_stats = norm_stats or {}
    if modality in norm_stats.get("mean", {}) and modality in norm_stats.get("std", {}):
        mean = torch.as_tensor(norm_stats["mean"][modality], dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(norm_stats["std"][modality], dtype=torch.float32).view(-1, 1, 1)
        if mean.shape[0] == image.shape[0]:
            image = image * std + mean
    image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    low = torch.quantile(image.flatten(), 0.02)
    high = torch.quantile(image.flatten(), 0.98)
    image = ((image - low) / (high - low + 1e-6)).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8).copy()


def _outline(masks: torch.Tensor) -> torch.Tensor:
    """Pixels on the boundary of any of the masks [N,H,W] -> bool [H,W]."""
    if masks.numel() == 0:
        return torch.zeros(masks.shape[-2:], dtype=torch.bool)
    masks = masks.float().unsqueeze(1)
    eroded = -F.max_pool2d(-masks, kernel_size=3, stride=1, padding=1)
    return ((masks - eroded) > 0).any(dim=0)[0]
