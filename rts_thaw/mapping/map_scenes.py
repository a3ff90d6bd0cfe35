"""Map a list of scenes with a checkpoint: one GeoPackage (and optional GeoJSON / score COG) per scene.

Scenes already done are skipped, leftovers of an interrupted run are removed, and
each scene's files appear only when complete, so a killed run resumes cleanly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import wait
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from affine import Affine

from rts_thaw.core.checkpoints import load_checkpoint
from rts_thaw.data.geotiff import SceneReader, SceneSpec
from rts_thaw.data.scene_sources import load_scenes
from rts_thaw.data.normalization import NormStats
from rts_thaw.mapping.engine import TilingConfig, check_precision, predict_tiles
from rts_thaw.mapping.map_identity import claim_output_dir, map_identity
from rts_thaw.mapping.scene_finish import SceneJob, finish_scene
from rts_thaw.mapping.scene_outputs import EXTRA_OUTPUTS, SceneOutputs, checkpoint_identity
from rts_thaw.mapping.shards import shard_scenes
from rts_thaw.mapping.tile_sources import SceneTiles
from rts_thaw.mapping.writer_pool import writer_pool
from rts_thaw.models.checkpoint import detector_from_checkpoint

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    detector: torch.nn.Module
    norm_stats: NormStats
    tile_size: int
    name: str
    identity: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ckpt_path: str | Path, device: torch.device) -> LoadedModel:
    checkpoint = load_checkpoint(ckpt_path)
    info = checkpoint["rts_thaw"]
    detector = detector_from_checkpoint(checkpoint).to(device).eval()
    config = info.get("config") or {}
    name = config.get("name") or type(detector).__name__
    return LoadedModel(detector, NormStats.from_dict(info["norm_stats"]), int(info["tile_size"]), str(name),
                       checkpoint_identity(ckpt_path))


def set_detection_limits(detector: torch.nn.Module, score_threshold: float | None = None,
                         max_detections: int | None = None, proposals: int | None = None) -> None:
    """Set what the heads keep (detections scoring >= `score_threshold`, at most `max_detections`
    per tile: masks are computed only for those) and how many RPN proposals per tile they see.
    The tiling config is the one place these are set; None means the checkpoint's own value,
    also on a detector an earlier call changed."""
    heads, rpn = getattr(detector, "roi_heads", None), getattr(detector, "rpn", None)
    limits = {"score_threshold": (heads, "score_thresh"), "max_detections": (heads, "detections_per_img")}
    has_rpn = hasattr(rpn, "test_proposals")  # the detector's ProposalNetwork
    if proposals is not None and not has_rpn:
        raise ValueError(f"tiling.proposals={proposals}: this model has no torchvision RPN to limit")
    own = getattr(detector, "_checkpoint_limits", None)
    if own is None:  # the first call: remember the checkpoint's values, for None to restore
        own = {name: getattr(module, attr) for name, (module, attr) in limits.items() if hasattr(module, attr)}
        if has_rpn:
            own["proposals"] = rpn.test_proposals
        detector._checkpoint_limits = own
    asked = {"score_threshold": score_threshold, "max_detections": max_detections, "proposals": proposals}
    for name, (module, attr) in limits.items():
        if name in own:
            setattr(module, attr, own[name] if asked[name] is None else asked[name])
    if has_rpn:
        rpn.test_proposals = own["proposals"] if proposals is None else proposals


def scene_grid(spec: SceneSpec, modalities: list[str], optional: list[str] = ()) -> tuple[str, Affine, tuple[int, int]]:
    """(CRS as WKT, transform, (height, width)) of a scene's reference grid; opening the scene
    checks that its modalities can be read and are aligned."""
    with SceneReader(spec, modalities, optional) as reader:
        if reader.absent:
            log.info("scene %s has no %s raster: mapped without it", spec.id, ", ".join(reader.absent))
        return reader.crs.to_wkt(), reader.transform, (reader.height, reader.width)


def check_modalities(scenes: list[SceneSpec], modalities: list[str], source: Path, optional: list[str] = ()) -> None:
    """Every scene must have every modality the model cannot map without: checked before any work."""
    required = set(modalities) - set(optional)
    lacking = {s.id: sorted(required - set(s.rasters)) for s in scenes if required - set(s.rasters)}
    if lacking:
        listed = "; ".join(f"{sid} lacks {missing}" for sid, missing in list(lacking.items())[:5])
        raise ValueError(f"{source}: the checkpoint reads modalities {modalities}, but {len(lacking)} scene(s) "
                         f"do not have them: {listed}")


def map_scenes(model: LoadedModel, scenes_path: str | Path, output_dir: str | Path, tiling: TilingConfig,
               device: torch.device, shard: int = 0, num_shards: int = 1, outputs: Sequence[str] = (),
               progress: bool = True, precision: str | int = "32", overwrite: bool = False,
               stac: Mapping | None = None) -> list[dict]:
    """Predict every scene of `scenes_path` (a scene list, or a STAC file read with the `stac`
    settings: scene_sources.load_scenes) of this shard that is not done yet; returns one summary per scene.
    Each scene gets its GeoPackage and the `outputs` asked for (`scene_outputs.EXTRA_OUTPUTS`).
    Maps already in `output_dir` must have been made the same way (`map_identity`), unless
    `overwrite`, which maps every scene again.

    Pasting masks, merging, vectorising and writing a finished scene run in
    `tiling.writer_count(device)` separate processes (0: one background thread) while the
    model goes on with the next scene's tiles.
    """
    check_precision(precision)
    scenes_path, output_dir = Path(scenes_path), Path(output_dir)
    scenes = shard_scenes(load_scenes(scenes_path, stac=stac), shard, num_shards)
    optional = model.detector.optional_modalities
    check_modalities(scenes, list(model.detector.modalities), scenes_path, optional)
    set_detection_limits(model.detector, tiling.score_threshold, tiling.max_detections, tiling.proposals)
    unknown = [name for name in outputs if name not in EXTRA_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown scene outputs {unknown}; choose from {sorted(EXTRA_OUTPUTS)}")
    identity = map_identity(model.identity, model.detector.modalities, tiling, precision, outputs)
    output_dir.mkdir(parents=True, exist_ok=True)
    skip_done = claim_output_dir(output_dir, identity, overwrite)
    summaries = {s.id: {"scene_id": s.id, "status": "skipped (done)"} for s in scenes}
    todo = [s for s in scenes if not (skip_done and SceneOutputs(output_dir, s.id).done())]
    for spec in todo:
        SceneOutputs(output_dir, spec.id).remove_leftovers()
    grids = [scene_grid(spec, list(model.detector.modalities), optional) for spec in todo]  # fail before any work
    source = SceneTiles(todo, [shape for _, _, shape in grids], tiling.tile_size, tiling.stride,
                        list(model.detector.modalities), model.norm_stats, optional)
    started = time.perf_counter()

    finishing = {}  # scene id -> the future of its writing
    finisher = writer_pool(tiling.writer_count(device) if todo else 0)  # they start now, beside the model's loop

    def hand_over(scene: int, tiles, stats) -> None:  # the sink: a scene's tiles are all through
        crs_wkt, transform, shape = grids[scene]
        spec = todo[scene]
        finishing[spec.id] = finisher.submit(finish_scene, SceneJob(
            spec.id, tiles, transform, crs_wkt, shape, output_dir, model.name, model.identity, tiling,
            tuple(outputs), stats, spec.date, spec.site))

    try:
        predict_tiles(model.detector, source, tiling, device, hand_over, score_threshold=tiling.score_threshold,
                      progress=progress, precision=precision)
    finally:
        wait(finishing.values())  # even when interrupted, scenes whose tiles all went through the model are written
        # every output is complete: the writers' exit (an interpreter's teardown each) need not hold up the caller
        finisher.shutdown(wait=False)
    failed = {}
    for scene_id, future in finishing.items():
        if future.exception() is None:
            summaries[scene_id] = future.result()
        else:
            failed[scene_id] = future.exception()
    if failed:
        listed = "; ".join(f"{scene_id}: {type(e).__name__}: {e}" for scene_id, e in list(failed.items())[:5])
        raise RuntimeError(f"{output_dir}: {len(failed)} of {len(finishing)} scene(s) could not be written "
                           f"(the others were; a rerun redoes only these): {listed}") from next(iter(failed.values()))
    if todo and progress:
        print(f"mapped {len(todo)} scene(s) in {time.perf_counter() - started:.1f} s")
    return [summaries[s.id] for s in scenes]
