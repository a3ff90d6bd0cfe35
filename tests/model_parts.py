"""The model's parts as its configs make them: a `model/<group>` option, with overrides,
instantiated into the partial that `build_detector` completes."""

from __future__ import annotations

from importlib.resources import files

from hydra.utils import instantiate
from omegaconf import OmegaConf


def part(group: str, option: str, **params):
    cfg = OmegaConf.load(str(files("rts_thaw.conf") / "model" / group / f"{option}.yaml"))
    return instantiate(OmegaConf.merge(cfg, params))


def make_fusion(name: str, feature_channels: dict, **params):
    return part("fusion", name, **params)(feature_channels=feature_channels)
