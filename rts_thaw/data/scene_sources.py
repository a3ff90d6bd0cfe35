"""Read a scene source into SceneSpecs, whichever kind of file it is: the one place callers
(training data, evaluation, predict) go, so none of them branches on the kind."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rts_thaw.data.geotiff import SceneError, SceneSpec, load_scene_list
from rts_thaw.data.stac import STAC_SETTINGS, is_stac_file, load_stac_scenes


def load_scenes(path: str | Path, labelled: bool = False, on_error: str = "raise",
                stac: Mapping | None = None) -> list[SceneSpec]:
    """The scenes of a STAC file (.json: catalog, collection, item or item collection, read with
    the `stac` settings, see stac.load_stac_scenes) or of a scene-list YAML (stac unused).
    `labelled` and `on_error` as in geotiff.load_scene_list."""
    if not is_stac_file(path):
        return load_scene_list(path, labelled=labelled, on_error=on_error)
    settings = dict(stac or {})
    for key in settings:
        if key not in STAC_SETTINGS:
            close = difflib.get_close_matches(str(key), STAC_SETTINGS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are {', '.join(STAC_SETTINGS)}"
            raise ValueError(f"unknown stac setting {key!r} ({hint})")
    if not settings.get("assets"):
        raise SceneError(f"{path}: a STAC file needs stac.assets, the asset key of each modality "
                         "(e.g. data=stac data.stac.assets={rgb: visual}; predict: stac.assets={rgb: visual})")
    return load_stac_scenes(path, labelled=labelled, on_error=on_error, **settings)


def data_path(data_cfg: DictConfig) -> str:
    """The path a data config reads: its `path`, or the one its path's `_target_` makes (a
    generated world, made if absent, whose folder names every parameter of the world and the
    generator's version)."""
    path = data_cfg.get("path")
    if OmegaConf.is_config(path) and "_target_" in path:
        return str(instantiate(path))
    return str(path)
