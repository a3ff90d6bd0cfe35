"""Train a detector: `python -m rts_thaw.train [+experiment=<name>] [overrides]`.

The entry point only composes and dispatches: a staged fusion run
(`training.staged=true`), a stage-1 run stored in the shared cache
(`training.stage1_cache=true`), or a plain run in Hydra's run directory.
Re-running the same command finds the same run directory and resumes from its
last checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.lightning_logging import log_lightning_through_hydra
from rts_thaw.training.run_identity import run_directory_name

log = logging.getLogger(__name__)


if not OmegaConf.has_resolver("rts_thaw.run_id"):
    OmegaConf.register_new_resolver("rts_thaw.run_id", run_directory_name)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run what `cfg` describes in `run_dir`; returns its results."""
    from rts_thaw.core.json_files import write_json_atomic
    from rts_thaw.models.encoders import check_tile_size
    from rts_thaw.models.speed import check_compile_parts
    from rts_thaw.training import staged
    from rts_thaw.training.ranks import is_global_zero
    from rts_thaw.training.single_run import fit_and_test

    if str(cfg.data.tile_size) == "auto":
        resolve_auto_tile_size(cfg)
    # Fail before any data is generated or read when the tiles cannot pass the encoder.
    check_tile_size(int(cfg.data.tile_size), cfg.model.encoder, cfg.model.get("img_size"))
    check_compile_parts(cfg.training.speed.compile, "training.speed.compile")
    run_dir = Path(run_dir)
    if cfg.training.staged:
        return staged.run_staged(cfg, run_dir)
    if cfg.training.stage1_cache:
        encoders = staged.stage1_encoders(cfg)
        if len(encoders) != 1:
            raise ValueError(
                "training.stage1_cache=true stores a stage-1 model, one encoder: set one modality "
                f"(e.g. data.modalities=[rgb]) or model/fusion=data_level; got {list(cfg.data.modalities)} "
                f"with encoders {encoders}"
            )
        stage1 = staged.stage1_config(cfg, encoders[0])
        results = staged.ensure_stage1(stage1)
        if is_global_zero():
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "results.json", results, sort_keys=True)
    else:
        results = fit_and_test(cfg, run_dir)
    if is_global_zero():  # the other ranks of a multi-process run computed the same
        row = staged.table_row(cfg.name, results)
        staged.write_table([row], run_dir)
        print(staged.format_table([row]))
    return results


def resolve_auto_tile_size(cfg: DictConfig) -> None:
    """`data.tile_size=auto`: the smallest multiple of the batch padding that holds every chip, set
    in the config (so the encoders are built for it and every checkpoint records it)."""
    from hydra.utils import instantiate

    from rts_thaw.data.collate import PAD_MULTIPLE, padded_side

    side = instantiate(cfg.data, tile_size=PAD_MULTIPLE).largest_chip_side()
    tile_size = padded_side(side)
    with open_dict(cfg):
        cfg.data.tile_size = tile_size
    log.info("data.tile_size=auto: %d px, the smallest multiple of %d px (the batch padding, the encoders' "
             "coarsest stride) that holds the largest chip side, %d px", tile_size, PAD_MULTIPLE, side)


@hydra.main(config_path="pkg://rts_thaw.conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    log_lightning_through_hydra()
    results = train(cfg, HydraConfig.get().runtime.output_dir)
    final = results["stage2"] if "stage2" in results else results
    value = final.get("test", {}).get("segm_AP50", math.nan)
    return value  # the objective of Hydra sweepers


if __name__ == "__main__":
    main()
