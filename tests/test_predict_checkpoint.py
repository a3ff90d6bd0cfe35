"""`python -m rts_thaw.predict` with a real checkpoint: a tiny cascade detector fitted here with Lightning
on a generated synthetic world, then used to map scenes (resume after a kill, shards, merge), write a
challenge submission that validates, and be scored by `python -m rts_thaw.evaluate`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyproj
import pytest
import rasterio
import shapely
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rts_thaw import predict
from rts_thaw.data.datamodule import RTSDataModule
from rts_thaw.data.geotiff import load_scene_list, tile_windows
from rts_thaw.data.synthetic import WorldParams, generate_world
from rts_thaw.eval.submission import validate_submission
from rts_thaw.mapping.challenge import predict_challenge
from rts_thaw.mapping.map_scenes import load_model
from rts_thaw.mapping.engine import TilingConfig
from rts_thaw.models.detector import trained_with_modality_dropout
from rts_thaw.core.vectors import read_layer
from rts_thaw.training.module import DetectionModule

MODALITIES = ["rgb", "ndvi"]
TILE = 64
# small and quick: tiles of 64 px with 16 px overlap, few workers
TILING = ["tiling.overlap=16", "tiling.batch_size=2", "tiling.num_workers=1", "tiling.score_threshold=0.0",
          "tiling.max_detections=8", "progress=false"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on shared 2-core runners: one thread avoids thread-pool contention (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_world")
    # 96 px scenes: 2 x 2 tiles of 64 px with 16 px overlap, so every scene has seams
    params = WorldParams(scenes=3, size=96, seed=5, rts_per_scene=(2, 3), distractors_per_scene=(1, 2))
    return generate_world(root / "world", params)


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    """A Lightning checkpoint of the real detector after a short real fit."""
    return fit_checkpoint(world, tmp_path_factory.mktemp("ckpt"), "residual_cross_attention")


@pytest.fixture(scope="module")
def stacked_checkpoint(world, tmp_path_factory):
    """The same with the stacked input as the fusion's query."""
    return fit_checkpoint(world, tmp_path_factory.mktemp("stacked_ckpt"), "stacked_gated_local_attention")


def fit_checkpoint(world, root: Path, fusion: str, modality_dropout: float = 0.0) -> Path:
    pl.seed_everything(0)
    datamodule = RTSDataModule(source="geotiff", path=world, modalities=MODALITIES, tile_size=TILE, batch_size=2,
                               stats_cache_dir=root / "stats")
    datamodule.setup("fit")
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose(None, overrides=["+model=cascade_mvit", f"model/fusion={fusion}",
                                       f"+data.tile_size={TILE}", "+name=predict_test",
                                       f"+training.modality_dropout={modality_dropout}"])
    detector = instantiate(cfg.model)(modality_channels=datamodule.modality_channels,
                                      learned_missing=trained_with_modality_dropout(cfg))
    run_info = {"norm_stats": datamodule.norm_stats.to_dict(), "modalities": MODALITIES,
                "modality_channels": dict(datamodule.modality_channels), "tile_size": TILE,
                "config": OmegaConf.to_container(cfg, resolve=True)}
    module = DetectionModule(detector, optimizer={"lr": 1e-3, "weight_decay": 0.0}, run_info=run_info,
                             modality_dropout=modality_dropout)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule.train_dataloader())
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _predict_cli(*overrides, wait=True):
    """The real command line (a subprocess: its start-up costs seconds, so used sparingly)."""
    command = [sys.executable, "-m", "rts_thaw.predict", *overrides, "hydra.run.dir=.", "hydra/job_logging=none",
               "hydra/hydra_logging=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _predict_cfg(*overrides):
    """The predict config as `python -m rts_thaw.predict` composes it."""
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def test_maps_scenes_into_gis_layers(world, checkpoint, tmp_path):
    out = tmp_path / "maps"
    predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}", f"output_dir={out}",
                                          "geojson=true", "score_raster=true", f"output={tmp_path / 'all.gpkg'}",
                                          *TILING))
    scenes = load_scene_list(world)
    total = 0
    for spec in scenes:
        layer = read_layer(out / f"{spec.id}.gpkg")
        with rasterio.open(spec.rasters["rgb"]) as ds:
            crs, bounds = ds.crs, shapely.box(*ds.bounds)
        assert pyproj.CRS(layer.crs) == pyproj.CRS(crs.to_wkt())
        assert all(bounds.buffer(1e-6).contains(g) for g in layer.geometries)
        assert set(layer.columns) >= {"score", "area_m2", "scene_id", "date", "site", "model", "ckpt"}
        if len(layer):
            assert set(layer.columns["scene_id"]) == {spec.id}
            assert set(layer.columns["model"]) == {"predict_test"}
            assert layer.columns["ckpt"][0].startswith("tiny.ckpt:sha256:")
            assert ((0 <= layer.columns["score"]) & (layer.columns["score"] <= 1)).all()
            np.testing.assert_allclose(layer.columns["area_m2"], [g.area for g in layer.geometries])  # UTM metres
        assert len(read_layer(out / f"{spec.id}.geojson")) == len(layer)
        with rasterio.open(out / f"{spec.id}_score.tif") as ds:
            assert ds.crs == crs and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        total += len(layer)
    assert total > 0, "the tiny model found nothing at score >= 0: the pipeline dropped every detection"
    merged = read_layer(tmp_path / "all.gpkg")  # output=... merges the scenes into one layer
    assert len(merged) == total and set(merged.columns["date"]) == {""} and set(merged.columns["site"]) == {""}


def test_bf16_autocast_prediction(world, checkpoint, tmp_path):
    """precision=bf16-mixed runs the real model under bfloat16 autocast (CPU here, GPUs in use)
    and still writes valid layers; an unknown precision is refused before any work."""
    out = tmp_path / "maps"
    predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}", f"output_dir={out}",
                                          "precision=bf16-mixed", *TILING))
    layers = [read_layer(out / f"{spec.id}.gpkg") for spec in load_scene_list(world)]
    assert sum(len(layer) for layer in layers) > 0
    for layer in layers:
        assert ((0 <= layer.columns["score"]) & (layer.columns["score"] <= 1)).all()
    with pytest.raises(ValueError, match="precision='16' is not supported for prediction"):
        predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}",
                                              f"output_dir={tmp_path / 'other'}", "precision=16", *TILING))
    assert not (tmp_path / "other").exists()


def absolute_listing(world) -> dict:
    """The world's scene list with absolute paths, to be edited and written elsewhere."""
    listing = yaml.safe_load(Path(world).read_text())
    base = Path(world).parent
    for entry in listing["scenes"]:
        entry["rasters"] = {m: str(base / p) for m, p in entry["rasters"].items()}
        entry["labels"] = str(base / entry["labels"])
    return listing


def test_scenes_missing_an_auxiliary_modality_are_mapped_without_it(world, checkpoint, tmp_path):
    """The fused checkpoint reads rgb + ndvi. One scene has no NDVI raster, one an all-NaN NDVI
    (a cloud): both are mapped from RGB alone, and each polygon records what the model had."""
    listing = absolute_listing(world)
    del listing["scenes"][0]["rasters"]["ndvi"]
    with rasterio.open(listing["scenes"][1]["rasters"]["ndvi"]) as src:
        profile, shape = src.profile, src.shape
    cloudy = tmp_path / "ndvi_cloud.tif"
    with rasterio.open(cloudy, "w", **profile) as dst:
        dst.write(np.full((1, *shape), np.nan, dtype=np.float32))
    listing["scenes"][1]["rasters"]["ndvi"] = str(cloudy)
    scenes = tmp_path / "scenes.yaml"
    scenes.write_text(yaml.safe_dump(listing))

    out = tmp_path / "maps"
    predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={scenes}", f"output_dir={out}",
                                          *TILING))
    used = {entry["id"]: set(read_layer(out / f"{entry['id']}.gpkg").columns["modalities"])
            for entry in listing["scenes"]}
    assert used[listing["scenes"][0]["id"]] == {"rgb"}
    assert used[listing["scenes"][1]["id"]] == {"rgb"}
    assert used[listing["scenes"][2]["id"]] == {"rgb,ndvi"}


def test_a_stacked_query_refuses_a_scene_without_a_modality_before_any_work(world, stacked_checkpoint, tmp_path):
    """The stacked input's encoder reads NDVI too: without it that encoder would see made-up
    values, so such a scene is an error naming it, and nothing is written."""
    listing = absolute_listing(world)
    del listing["scenes"][1]["rasters"]["ndvi"]
    scenes = tmp_path / "scenes.yaml"
    scenes.write_text(yaml.safe_dump(listing))
    out = tmp_path / "maps"
    with pytest.raises(ValueError, match=rf"{listing['scenes'][1]['id']} lacks \['ndvi'\]"):
        predict.main.__wrapped__(_predict_cfg(f"ckpt_path={stacked_checkpoint}", f"scenes={scenes}",
                                              f"output_dir={out}", *TILING))
    assert not out.exists() or not list(out.glob("*.gpkg"))  # refused before any map was written


def test_a_stacked_query_trained_with_modality_dropout_maps_a_scene_without_a_modality(world, tmp_path):
    """Trained with modality dropout, its stacked encoder has met NDVI's channels mean-filled:
    the checkpoint says so, and a scene without NDVI is mapped from the rest."""
    dropout_checkpoint = fit_checkpoint(world, tmp_path / "ckpt", "stacked_gated_local_attention", 0.5)
    listing = absolute_listing(world)
    del listing["scenes"][1]["rasters"]["ndvi"]
    scenes = tmp_path / "scenes.yaml"
    scenes.write_text(yaml.safe_dump(listing))
    out = tmp_path / "maps"
    predict.main.__wrapped__(_predict_cfg(f"ckpt_path={dropout_checkpoint}", f"scenes={scenes}",
                                          f"output_dir={out}", *TILING))
    assert (out / f"{listing['scenes'][1]['id']}.gpkg").is_file()
    used = {entry["id"]: set(read_layer(out / f"{entry['id']}.gpkg").columns["modalities"])
            for entry in listing["scenes"]}
    assert used[listing["scenes"][1]["id"]] == {"rgb"}
    assert used[listing["scenes"][0]["id"]] == {"rgb,ndvi"}


def test_proposals_per_tile_limit_what_the_heads_see(world, checkpoint, tmp_path):
    """tiling.proposals caps the RPN proposals per tile, so each tile keeps at most that many
    detections; a count below 1 is refused before any output exists."""
    def raw_and_tiles(proposals):
        summaries = predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}",
                                                          f"output_dir={tmp_path / str(proposals)}",
                                                          f"tiling.proposals={proposals}", *TILING))
        return sum(s["raw_instances"] for s in summaries), sum(s["tiles"] - s["empty_tiles"] for s in summaries)

    raw, tiles = raw_and_tiles("null")  # the checkpoint's own count: several detections per tile
    assert raw > tiles
    raw, tiles = raw_and_tiles(1)
    assert 0 < raw <= tiles
    with pytest.raises(ValueError, match=r"tiling.proposals=0 must be a positive count"):
        predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}",
                                              f"output_dir={tmp_path / 'none'}", "tiling.proposals=0", *TILING))
    assert not (tmp_path / "none").exists()


@pytest.mark.faults
@pytest.mark.slow  # a long end-to-end run: `make test` runs it, `make test-fast` does not
def test_resume_after_kill_and_sharding(world, checkpoint, tmp_path):
    out = tmp_path / "maps"
    # one tile per batch, no reading workers, one writer process (scenes written one after
    # another): slow enough to be killed between scenes; the writer dies with the run
    process = _predict_cli(f"ckpt_path={checkpoint}", f"scenes={world}", f"output_dir={out}", *TILING,
                           "tiling.batch_size=1", "tiling.num_workers=0", "tiling.write_workers=1",
                           "tiling.overlap=32", wait=False)
    deadline = time.time() + 120
    while not list(out.glob("*.gpkg")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in out.glob("*.gpkg"))
    assert 1 <= len(done) < 3, f"the kill should land between scenes, got {done}"
    for path in done:  # whatever was there is complete
        read_layer(out / path)
    time.sleep(3)  # no orphaned writer finishes a scene after the run was killed
    assert sorted(p.name for p in out.glob("*.gpkg")) == done
    stamps = {p: (out / p).stat().st_mtime_ns for p in done}

    # the rerun, as two shards (the jobs of `-m shard=0,1 num_shards=2`), finishes the rest and skips what is
    # done; it maps as the killed run did (the same overlap: another would be refused, not mixed in)
    statuses = []
    for shard in (0, 1):
        statuses += predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}",
                                                          f"output_dir={out}", *TILING, "tiling.overlap=32",
                                                          "num_shards=2", f"shard={shard}"))
    assert sorted(s["scene_id"] for s in statuses) == ["scene_000", "scene_001", "scene_002"]
    assert sorted(s["scene_id"] for s in statuses if s["status"] == "skipped (done)") == [p[:-5] for p in done]
    assert sorted(p.name for p in out.iterdir()) == ["predict_identity.json", "scene_000.gpkg", "scene_001.gpkg",
                                                     "scene_002.gpkg"]
    assert {p: (out / p).stat().st_mtime_ns for p in done} == stamps

    predict.main.__wrapped__(_predict_cfg("merge=true", f"output_dir={out}", f"output={tmp_path / 'merged.gpkg'}"))
    merged = read_layer(tmp_path / "merged.gpkg")
    per_scene = [read_layer(out / f"scene_{i:03d}.gpkg") for i in range(3)]
    assert len(merged) == sum(len(layer) for layer in per_scene)
    assert sorted(set(merged.columns["scene_id"])) == sorted({s for layer in per_scene for s in layer.columns["scene_id"]})


def test_tile_larger_than_the_encoder_is_refused(world, checkpoint, tmp_path):
    cfg = _predict_cfg(f"ckpt_path={checkpoint}", f"scenes={world}", f"output_dir={tmp_path}", "tiling.tile_size=128")
    with pytest.raises(ValueError, match="larger than the checkpoint's encoder input size 64"):
        predict.main.__wrapped__(cfg)
    assert not list(tmp_path.iterdir())


def _challenge_release(root: Path, sizes: dict[int, tuple[int, int]]) -> Path:
    """A tiny release in the challenge layout: test chips (H x W x 8) and their manifest."""
    rng = np.random.default_rng(0)
    (root / "test" / "images").mkdir(parents=True)
    (root / "metadata").mkdir()
    rows = ["image_id,file_name"]
    for image_id, (h, w) in sizes.items():
        image = rng.normal(size=(h, w, 8)).astype(np.float32)
        image[..., :3] = rng.uniform(0, 255, size=(h, w, 3))
        np.savez_compressed(root / "test" / "images" / f"chip_{image_id}.npz", image=image)
        rows.append(f"{image_id},chip_{image_id}.npz")
    (root / "metadata" / "test_manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_challenge_submission_validates(checkpoint, tmp_path):
    sizes = {101: (64, 64), 102: (90, 120), 103: (40, 56)}  # 102 is larger than a tile: tiled and merged
    release = _challenge_release(tmp_path / "release", sizes)
    model = load_model(checkpoint, torch.device("cpu"))
    data_cfg = OmegaConf.create({"_target_": "rts_thaw.data.datamodule.RTSDataModule", "source": "arctic_challenge",
                                 "path": str(release)})  # modalities and tile size come from the checkpoint
    tiling = TilingConfig(tile_size=model.tile_size, overlap=32, batch_size=2, num_workers=0)
    path, problems = predict_challenge(model, data_cfg, "test", tmp_path / "submission.json", torch.device("cpu"),
                                       tiling, score_threshold=0.0, progress=False)
    assert problems == []
    submission = json.loads(path.read_text())
    assert submission, "at score >= 0 even a barely trained model detects something"
    assert {r["image_id"] for r in submission} <= set(sizes)
    assert all(tuple(r["segmentation"]["size"]) == sizes[r["image_id"]] for r in submission)
    # the same file against a manifest without chip 102 and with other sizes fails, naming the entries
    problems = validate_submission(path, {101: (64, 64), 103: (41, 56)})
    if any(r["image_id"] == 102 for r in submission):
        assert any("image_id is not in the test manifest" in p for p in problems)
    if any(r["image_id"] == 103 for r in submission):
        assert any("differs from the chip's H x W [41, 56]" in p for p in problems)

    # tiling.proposals in challenge mode, on the same (reused) model: one proposal per tile caps
    # each chip at one detection per tile; None then gives back the checkpoint's own count
    def per_chip(proposals):
        limited = TilingConfig(tile_size=model.tile_size, overlap=32, batch_size=2, num_workers=0, proposals=proposals)
        out, _ = predict_challenge(model, data_cfg, "test", tmp_path / f"p{proposals}.json", torch.device("cpu"),
                                   limited, score_threshold=0.0, progress=False)
        results = json.loads(out.read_text())
        return {image_id: sum(r["image_id"] == image_id for r in results) for image_id in sizes}

    tiles = {i: len(tile_windows(w, h, model.tile_size, 32)) for i, (h, w) in sizes.items()}
    one = per_chip(1)
    assert all(one[i] <= tiles[i] for i in sizes) and sum(one.values()) > 0
    assert per_chip(None) == {i: sum(r["image_id"] == i for r in submission) for i in sizes}


def test_challenge_commands_on_the_exported_world(world, checkpoint, tmp_path, capsys):
    """predict data=arctic_challenge -> submission.json; evaluate validate_submission=...; evaluate gt=... predictions=..."""
    from rts_thaw import evaluate
    from rts_thaw.data.export import export_challenge

    release = export_challenge(world, tmp_path / "release")
    submission = tmp_path / "submission.json"
    predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", "data=arctic_challenge", f"data.path={release}",
                                          "split=test", f"output={submission}", "submission_score_threshold=0.0",
                                          "tiling.overlap=16", "tiling.num_workers=0", "progress=false"))
    assert "(valid)" in capsys.readouterr().out

    def evaluate_cfg(*overrides):
        with initialize_config_module("rts_thaw.conf", version_base="1.3"):
            return compose("evaluate", overrides=[*overrides, f"output={tmp_path / 'metrics.json'}"])

    check = ["data=arctic_challenge", f"data.path={release}"]
    assert evaluate.main.__wrapped__(evaluate_cfg(f"validate_submission={submission}", *check)) == []
    # scored like the challenge's local evaluation, against the export's held-back test truth
    metrics = evaluate.main.__wrapped__(evaluate_cfg(f"gt={release / 'metadata' / 'test_ground_truth.json'}",
                                                     f"predictions={submission}", "preset=arctic_challenge"))
    assert 0.0 <= metrics["segm_AP50"] <= 100.0

    entries = json.loads(submission.read_text())
    entries[0]["score"] = 1.7
    entries.append({**entries[0], "image_id": 424242, "score": 0.5})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.main.__wrapped__(evaluate_cfg(f"validate_submission={bad}", *check))
    out = capsys.readouterr().out
    assert "entry 0 " in out and "score 1.7 is outside [0, 1]" in out
    assert f"entry {len(entries) - 1} (image_id 424242): image_id is not in the test manifest" in out
    assert "2 problem(s)" in out


def test_predict_on_coco_chips_writes_results_that_evaluate_scores(world, checkpoint, tmp_path, capsys):
    """predict data=coco_chips split=test output=preds.json: COCO results (masks at each chip's
    size, the larger chips tiled and merged) that `evaluate gt=... predictions=...` scores."""
    from rts_thaw import evaluate
    from rts_thaw.data.export import export_coco_chips

    root = export_coco_chips(world, tmp_path / "coco", modalities=("rgb", "ndvi", "nir"))
    preds = tmp_path / "preds.json"
    predict.main.__wrapped__(_predict_cfg(f"ckpt_path={checkpoint}", "data=coco_chips", f"data.path={root}",
                                          "split=test", f"output={preds}", "submission_score_threshold=0.0",
                                          "tiling.overlap=16", "tiling.num_workers=0", "progress=false"))
    assert "(valid)" in capsys.readouterr().out
    gt = json.loads((root / "test" / "annotations.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    results = json.loads(preds.read_text())
    assert results and all(tuple(r["segmentation"]["size"]) == sizes[r["image_id"]] for r in results)
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"gt={root / 'test' / 'annotations.json'}", f"predictions={preds}",
                                             f"output={tmp_path / 'metrics.json'}"])
    metrics = evaluate.main.__wrapped__(cfg)
    assert 0.0 <= metrics["segm_AP50"] <= 100.0 and 0.0 <= metrics["bbox_AP50"] <= 100.0
