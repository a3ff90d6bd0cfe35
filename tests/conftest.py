"""Shared fixtures: a small synthetic world, generated once per test session."""

from __future__ import annotations

import pytest

from rts_thaw.data.synthetic import ensure_world

# 4 scenes of 256 px (1 km at 4 m): 2 train, 1 val, 1 test; ~2 s to generate.
TINY_WORLD = {"scenes": 4, "size": 256, "seed": 7}


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory) -> str:
    """Path of the scene list file (scenes.yaml) of a small synthetic world."""
    return ensure_world(tmp_path_factory.mktemp("synthetic_world"), **TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_world_config(synthetic_world, tmp_path_factory) -> dict:
    """Keyword arguments of a small RTSDataModule on `synthetic_world` (the `data`
    config of a test run): 128 px tiles, batch 2, no workers, no augmentation.
    Use as `RTSDataModule(**tiny_world_config)` or as overrides of the `data` node."""
    return {
        "source": "geotiff",
        "path": synthetic_world,
        "modalities": ["rgb", "ndvi", "nir"],
        "tile_size": 128,
        "stride": 128,
        "batch_size": 2,
        "num_workers": 0,
        "min_valid_fraction": 0.5,
        "augment": None,
        "stats_cache_dir": str(tmp_path_factory.mktemp("norm_stats")),
    }
