"""The overrides of a fast CPU training run on conftest's tiny synthetic world, shared by the tests that train."""

from __future__ import annotations

from hydra import compose, initialize_config_module


def tiny_overrides(world: dict, cache_dir, *, experiment: str, modalities: list[str] | None = None,
                   epochs: int | None = None, logger: str | None = None) -> list[str]:
    """Train overrides for `experiment` on `world` (the `tiny_world_config` fixture) that run in seconds on a CPU."""
    overrides = [
        f"+experiment={experiment}", "data=geotiff", f"data.path={world['path']}", "data.tile_size=64",
        "data.stride=64", "data.batch_size=4", "data.eval_batch_size=2", "data.num_workers=0", "data.augment=null",
        f"data.stats_cache_dir={world['stats_cache_dir']}", f"paths.cache_dir={cache_dir}",
        "trainer=cpu", "trainer.enable_progress_bar=false",
    ]
    if modalities is not None:
        overrides.append(f"data.modalities=[{','.join(modalities)}]")
    if epochs is None:  # a single step
        overrides.append("trainer.fast_dev_run=true")
    else:
        overrides += [f"trainer.max_epochs={epochs}", "training.stage2.max_epochs=null", "trainer.limit_train_batches=2",
                      "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    if logger is not None:
        overrides.append(f"logger={logger}")
    return overrides


def compose_train(overrides: list[str]):
    """The `train` config with `overrides`, composed from the installed package as the entry point does."""
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        return compose("train", overrides=overrides)
