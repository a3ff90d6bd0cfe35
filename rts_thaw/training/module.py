"""The LightningModule around a `MultiModalDetector`: losses, COCO metrics, optimiser."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from rts_thaw.data.collate import padded_size
from rts_thaw.data.sampling import numpy_state_from_tensors, numpy_state_to_tensors
from rts_thaw.eval.coco_metric import CocoMetric
from rts_thaw.mapping.chip_tiling import whole_chip_outputs
from rts_thaw.mapping.engine import TilingConfig
from rts_thaw.training.optim import build_optimizer


class DetectionModule(pl.LightningModule):
    """Trains and evaluates one detector on batches of the data contract.

    `run_info` (norm_stats, modalities, modality_channels, tile_size, config) is
    written into every checkpoint under `checkpoint["rts_thaw"]`, so that
    evaluation and prediction rebuild the model and its inputs from the file alone.

    Validation and test chips larger than `run_info["tile_size"]` (the encoders' input) are
    scored whole: tiled with `chip_overlap` px of overlap (None: a quarter of the tile) and
    merged across seams by the prediction engine, as `predict` does.
    """

    def __init__(
        self,
        detector: nn.Module,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        coco_preset: str = "coco",
        run_info: dict | None = None,
        modality_dropout: float = 0.0,
        chip_overlap: int | None = None,
    ):
        super().__init__()
        self.detector = detector
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"training.modality_dropout must be in [0, 1), got {modality_dropout}")
        if modality_dropout and not detector.droppable_modalities:
            raise ValueError(f"training.modality_dropout={modality_dropout} needs a model that can learn to run "
                             f"without an auxiliary modality (residual_cross_attention, gated_local_attention, "
                             f"data_level or stacked_gated_local_attention fusion), not this "
                             f"{type(detector.fusion).__name__} over encoders {list(detector.encoders)}")
        self.modality_dropout = modality_dropout
        self.droppable = detector.droppable_modalities if modality_dropout else []  # never the query
        self.optimizer_cfg = dict(optimizer or {"lr": 1e-3, "weight_decay": 0.05})
        self.scheduler_cfg = dict(scheduler or {"name": "cosine", "warmup_steps": 0})
        self.coco_preset = coco_preset
        self.run_info = dict(run_info or {})
        tile_size = self.run_info.get("tile_size")
        if chip_overlap is not None and tile_size and not 0 <= int(chip_overlap) < int(tile_size):
            raise ValueError(f"chip_overlap={chip_overlap} (training.chip_overlap, or evaluate's chip_overlap) must be "
                             f"at least 0 and smaller than the tile, {tile_size} px")
        self.chip_overlap = chip_overlap
        self.val_metric = CocoMetric(coco_preset)
        self.test_metric = CocoMetric(coco_preset)
        self.test_metrics: dict[str, float] = {}
        # The last validation batch and its predictions, for the image-logging callback.
        self.last_val_example: tuple[dict, list[dict]] | None = None
        self._batch_start_rng: tuple | None = None  # the random state as the running batch began

    def forward(self, batch: dict) -> list[dict]:
        return self.detector(batch["image"], batch["image_sizes"])

    # ---- training -------------------------------------------------------------------
    def _dropped(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """Modality dropout: each auxiliary modality is withheld from each image with
        probability `modality_dropout`, so the model learns to map without it."""
        if not self.droppable:
            return None
        batch_size = len(batch["image_sizes"])
        device = next(iter(batch["image"].values())).device
        return {m: torch.rand(batch_size, device=device) >= self.modality_dropout for m in self.droppable}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.detector(batch["image"], batch["image_sizes"], batch["targets"], available=self._dropped(batch))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                + " (lower training.optimizer.lr or raise the warm-up)"
            )
        batch_size = len(batch["image_sizes"])
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in losses.items()},
            batch_size=batch_size,
        )
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        optimizer, schedule = build_optimizer(
            self.detector,
            lr=self.optimizer_cfg["lr"],
            weight_decay=self.optimizer_cfg.get("weight_decay", 0.0),
            betas=self.optimizer_cfg.get("betas", (0.9, 0.999)),
            fused=bool(self.optimizer_cfg.get("fused", False)),
            total_steps=max(int(self.trainer.estimated_stepping_batches), 1),
            scheduler=self.scheduler_cfg.get("name", "cosine"),
            warmup_steps=self.scheduler_cfg.get("warmup_steps", 0),
            step_milestones=self.scheduler_cfg.get("step_milestones", (0.7, 0.9)),
            step_gamma=self.scheduler_cfg.get("step_gamma", 0.1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, whose step would
        # unscale float16 gradients itself. bfloat16 has no gradient scaler: the gradients are
        # already true, so they are clipped here as in float32.
        if gradient_clip_val and optimizer.defaults.get("fused") and self.trainer.precision == "bf16-mixed":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- evaluation -----------------------------------------------------------------
    def _chip_tiling(self) -> TilingConfig | None:
        """How chips larger than the tile are tiled for evaluation; None: no tile size is known."""
        tile_size = self.run_info.get("tile_size")
        if not tile_size:
            return None
        overlap = self.chip_overlap if self.chip_overlap is not None else int(tile_size) // 4
        return TilingConfig(tile_size=int(tile_size), overlap=int(overlap), num_workers=0)

    def _predictions(self, batch: dict) -> list[dict]:
        """The detector's outputs for each image of an evaluation batch. Chips that fit the tile go
        through the detector as one batch; larger ones through the prediction engine, whole."""
        sizes = batch["image_sizes"]
        tiling = self._chip_tiling()
        large = [i for i, (h, w) in enumerate(sizes) if tiling is not None and max(h, w) > tiling.tile_size]
        if not large:
            return self.detector(batch["image"], sizes)
        samples = []
        for i in large:  # each chip unpadded, on the host, as a chip dataset serves it
            h, w = sizes[i]
            samples.append({"image": {m: x[i, :, :h, :w].cpu() for m, x in batch["image"].items()},
                            "valid": batch["valid"][i, :h, :w].cpu()})
        outputs = dict(zip(large, whole_chip_outputs(self.detector, samples, tiling, self.device, self._precision())))
        fits = [i for i in range(len(sizes)) if i not in outputs]
        if fits:
            height, width = padded_size([sizes[i] for i in fits])
            images = {m: x[fits, :, :height, :width] for m, x in batch["image"].items()}
            outputs.update(zip(fits, self.detector(images, [sizes[i] for i in fits])))
        return [outputs[i] for i in range(len(sizes))]

    def _precision(self) -> str:
        """The run's arithmetic for the engine's forward: bfloat16 autocast or float32."""
        try:
            return "bf16-mixed" if self.trainer.precision == "bf16-mixed" else "32"
        except RuntimeError:  # not attached to a Trainer: called on its own
            return "32"

    def _evaluate_batch(self, batch: dict, metric: CocoMetric) -> list[dict]:
        predictions = self._predictions(batch)
        image_ids = [meta["image_id"] for meta in batch["meta"]]
        metric.update(predictions, batch["targets"], batch["image_sizes"], image_ids)
        return predictions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        predictions = self._evaluate_batch(batch, self.val_metric)
        if batch_idx == 0:
            self.last_val_example = (batch, predictions)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_batch(batch, self.test_metric)

    # Reset at the start (a loop interrupted mid-epoch leaves partial state) and after computing
    # (the accumulated masks are freed between epochs rather than held through training).
    def on_validation_epoch_start(self) -> None:
        self.val_metric.reset()

    def on_test_epoch_start(self) -> None:
        self.test_metric.reset()

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metric.compute()  # torchmetrics gathers the ranks' images
        self.val_metric.reset()
        self._log_metrics("val", metrics)

    def on_test_epoch_end(self) -> None:
        metrics = self.test_metric.compute()
        self.test_metric.reset()
        self.test_metrics = metrics
        self._log_metrics("test", metrics)

    def _log_metrics(self, split: str, metrics: dict[str, float]) -> None:
        # Undefined metrics (no object of a size class) are logged as -1 rather than
        # NaN so that checkpoint selection and W&B charts stay well defined.
        # Every rank holds the same gathered metrics: their mean across ranks is the value.
        values = {f"{split}/{k}": (-1.0 if math.isnan(v) else float(v)) for k, v in metrics.items()}
        headline = f"{split}/segm_AP50"
        self.log(headline, values.pop(headline), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)

    # ---- checkpoints ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rts_thaw"] = self.run_info
        # The random state (proposal sampling, augmentation, dropout draw from it), so that a
        # resumed run draws what an uninterrupted one would: of this moment, or, when a batch was
        # interrupted (Ctrl-C, SIGTERM), of that batch's start, since the resumed run trains it again.
        # Tensors and plain values only: Lightning restores checkpoints with weights_only loading.
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        torch_state, python_state = self._batch_start_rng or (None, None)
        if progress.started <= progress.processed or torch_state is None:
            torch_state, python_state = torch.get_rng_state(), random.getstate()
        else:
            # Lightning, restarting from within a batch, counts one more stepped batch than there
            # were (its count is meant for checkpoints written at a batch's end), which shifts the
            # logging steps of the resumed run by one; the count is stored one lower to cancel that.
            epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            if "_batches_that_stepped" in epoch_loop:
                epoch_loop["_batches_that_stepped"] -= 1
        checkpoint["rng_states"] = {"torch": torch_state, "python": python_state,
                                    "numpy": numpy_state_to_tensors(np.random.get_state())}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start_rng = (torch.get_rng_state(), random.getstate())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_info = checkpoint.get("rts_thaw", self.run_info)
        states = checkpoint.get("rng_states")
        if states is not None and self.trainer.state.fn == "fit":  # resuming, not testing
            torch.set_rng_state(states["torch"])
            np.random.set_state(numpy_state_from_tensors(states["numpy"]))
            random.setstate(states["python"])
            # (a checkpoint written within an epoch also holds the data module's numpy state for the
            # batch trained next, which the data module restores after this: rts_thaw.data.sampling)

