"""Track: turn per-date slump maps into slump histories (issue 18).

    python -m rts_thaw.track maps='[maps/2019.gpkg,maps/2021.gpkg]' output_dir=tracks
    python -m rts_thaw.track 'maps=[predictions/*.gpkg]' output_dir=tracks
    python -m rts_thaw.track scenes=<scene list .yaml> output_dir=tracks

A thin entry point (see conf/track.yaml); the work lives in rts_thaw.tracking.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="pkg://rts_thaw.conf", config_name="track", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from rts_thaw.tracking.run import track
    from rts_thaw.tracking.tracker import TrackSettings

    settings = TrackSettings(tolerance_m=float(cfg.tolerance_m), min_overlap=float(cfg.min_overlap),
                             uncertainty_m=float(cfg.uncertainty_m), align=bool(cfg.align),
                             min_tie_points=int(cfg.min_tie_points), upslope=str(cfg.upslope))
    maps = OmegaConf.to_container(cfg.maps, resolve=True) if cfg.maps else None
    if isinstance(maps, str):
        maps = [maps]
    result = track(cfg.output_dir, settings, maps=maps, scenes=cfg.scenes, date_column=cfg.date_column,
                   site_column=cfg.site_column, on_single_date=cfg.on_single_date, output_crs=cfg.output_crs,
                   plots=cfg.plots, map_site=cfg.map_site)
    print(json.dumps(result["sites"]))
    for name, path in result["written"].items():
        print(f"{name:>10}: {path}")
    return result


if __name__ == "__main__":
    main()
