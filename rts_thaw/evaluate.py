"""Evaluate: `python -m rts_thaw.evaluate ckpt_path=... [data=...] [split=test]`.

A thin dispatcher over evaluation modes; each mode lives in its own module.
"""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig, OmegaConf

from rts_thaw.lightning_logging import log_lightning_through_hydra


def evaluate_checkpoint_mode(cfg: DictConfig) -> dict:
    from rts_thaw.core.json_files import write_json_atomic
    from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY
    from rts_thaw.training.evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        cfg.ckpt_path,
        data_cfg=cfg.get("data"),
        split=cfg.split,
        preset=cfg.preset,
        trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True),
        missing_modalities=list(cfg.missing_modalities or []),
        chip_overlap=cfg.get("chip_overlap"),
        data_overrides=list(cfg.get("data_overrides") or []),
    )
    output = write_json_atomic(cfg.output, {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split,
                                            "missing_modalities": list(cfg.missing_modalities or []),
                                            "data_overrides": list(cfg.get("data_overrides") or []),
                                            SCORE_UNIT_KEY: SCORE_UNIT, "metrics": metrics}, sort_keys=True)
    for name, value in metrics.items():
        print(f"{name:>12}: {'-' if math.isnan(value) else f'{value:.2f}'}")
    print(f"metrics (in percent) written to {output}")
    return metrics


@hydra.main(config_path="pkg://rts_thaw.conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig):
    if cfg.get("validate_submission"):
        from rts_thaw.eval.modes import validate_submission_mode
        return validate_submission_mode(cfg)
    if cfg.get("tracks") or cfg.get("truth"):
        from rts_thaw.eval.modes import score_tracks_mode
        return score_tracks_mode(cfg)
    if cfg.get("gt") or cfg.get("predictions"):
        from rts_thaw.eval.modes import score_files_mode
        return score_files_mode(cfg)
    if cfg.get("ckpt_path"):
        log_lightning_through_hydra()
        return evaluate_checkpoint_mode(cfg)
    raise ValueError("nothing to evaluate: pass ckpt_path=<checkpoint> (and optionally data=<source>), "
                     "gt=<file> predictions=<file>, tracks=<dir> truth=<dir>, or validate_submission=<submission.json>")


if __name__ == "__main__":
    main()
