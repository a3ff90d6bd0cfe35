"""Predict: map scenes into GIS layers, merge shards, or write a challenge submission.

    python -m rts_thaw.predict ckpt_path=<file.ckpt> scenes=<scene list .yaml>
    python -m rts_thaw.predict ckpt_path=<file.ckpt> scenes=<STAC catalog.json> stac.assets={rgb: visual}
    python -m rts_thaw.predict merge=true output_dir=<dir> [output=<all.gpkg>]
    python -m rts_thaw.predict data=arctic_challenge split=test ckpt_path=... output=submission.json

A thin dispatcher (see conf/predict.yaml); the work lives in rts_thaw.mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def _tiling(cfg: DictConfig, model_tile_size: int):
    from rts_thaw.mapping.engine import TilingConfig

    tiling = OmegaConf.to_container(cfg.tiling, resolve=True)
    tile_size = tiling.pop("tile_size") or model_tile_size
    if tile_size > model_tile_size:
        raise ValueError(f"tiling.tile_size={tile_size} is larger than the checkpoint's encoder input "
                         f"size {model_tile_size}; use tiling.tile_size<={model_tile_size}")
    return TilingConfig(tile_size=tile_size, **tiling)


def _load_model(cfg: DictConfig, device):
    """The checkpoint's model on `device`, with the run's speed switches (`speed`)."""
    from rts_thaw.mapping.map_scenes import load_model
    from rts_thaw.models.speed import apply_speed

    model = load_model(cfg.ckpt_path, device)
    apply_speed(model.detector, cfg.speed.channels_last, cfg.speed.compile, cfg.speed.compile_options)
    return model


def merge_mode(cfg: DictConfig) -> Path:
    from rts_thaw.mapping.shards import merge_scene_layers

    output_dir = Path(cfg.output_dir)
    output = Path(cfg.output) if cfg.output else output_dir / "merged.gpkg"
    layers = [p for p in sorted(output_dir.glob("*.gpkg")) if p.resolve() != output.resolve()]
    merge_scene_layers(layers, output, cfg.merge_crs)
    print(f"merged {len(layers)} scene layer(s) into {output}")
    return output


def scenes_mode(cfg: DictConfig) -> list[dict]:
    from rts_thaw.mapping.map_scenes import map_scenes, resolve_device
    from rts_thaw.mapping.scene_outputs import EXTRA_OUTPUTS

    device = resolve_device(cfg.device)
    model = _load_model(cfg, device)
    outputs = [name for name in EXTRA_OUTPUTS if cfg.get(name)]  # each format has its switch
    stac = OmegaConf.to_container(cfg.stac, resolve=True) if cfg.get("stac") is not None else None
    summaries = map_scenes(model, cfg.scenes, cfg.output_dir, _tiling(cfg, model.tile_size), device,
                           shard=cfg.shard, num_shards=cfg.num_shards, outputs=outputs, progress=cfg.progress,
                           precision=cfg.precision, overwrite=cfg.overwrite, stac=stac)
    for summary in summaries:
        print(json.dumps(summary))
    if cfg.output and cfg.num_shards == 1:
        merge_mode(cfg)
    return summaries


def challenge_mode(cfg: DictConfig) -> Path:
    from rts_thaw.mapping.challenge import predict_challenge
    from rts_thaw.mapping.map_scenes import resolve_device

    if not cfg.output:
        raise ValueError("challenge mode needs output=<submission.json>")
    device = resolve_device(cfg.device)
    model = _load_model(cfg, device)
    tiling = _tiling(cfg, model.tile_size)
    path, problems = predict_challenge(model, cfg.data, cfg.split, cfg.output, device, tiling,
                                       score_threshold=cfg.get("submission_score_threshold"), progress=cfg.progress,
                                       precision=cfg.precision)
    print(f"submission written to {path} ({'valid' if not problems else f'{len(problems)} problem(s)'})")
    for problem in problems:
        print(f"  {problem}")
    return path


@hydra.main(config_path="pkg://rts_thaw.conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig):
    if cfg.merge:
        return merge_mode(cfg)
    if not cfg.ckpt_path:
        raise ValueError("predict needs ckpt_path=<checkpoint> (or merge=true output_dir=<dir>)")
    from rts_thaw.models.speed import check_compile_parts

    check_compile_parts(cfg.speed.compile, "speed.compile")  # before any scene is opened
    if cfg.get("data") is not None:
        return challenge_mode(cfg)
    if cfg.scenes:
        return scenes_mode(cfg)
    raise ValueError("nothing to predict: pass scenes=<scene list .yaml | STAC .json> or data=<source> split=<split>")


if __name__ == "__main__":
    main()
