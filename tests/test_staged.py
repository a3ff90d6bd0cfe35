"""Staged training: the stage-1 cache (reuse, retrain on change, bad entries), frozen
encoders through stage 2, the final table, and evaluate reproducing the test metrics."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rts_thaw.train import train
from rts_thaw.training import staged
from rts_thaw.training.evaluation import evaluate_checkpoint

from tiny_run import compose_train, tiny_overrides


def encoder_state(checkpoint_path, modality):
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = f"detector.encoders.{modality}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def staged_run(tiny_world_config, tmp_path_factory):
    """One staged run of the RGB-query fusion (stage 1 for rgb and ndvi, then stage 2), shared by
    the tests below; the default's stacked query is staged in its own test."""
    cache = tmp_path_factory.mktemp("cache")
    overrides = tiny_overrides(tiny_world_config, cache, experiment="staged_fusion", modalities=["rgb", "ndvi"],
                               epochs=1) + ["model/fusion=gated_local_attention", "training.modality_dropout=0"]
    run_dir = tmp_path_factory.mktemp("staged_run")
    results = train(compose_train(overrides), run_dir)
    return {"overrides": overrides, "cache": cache, "run_dir": run_dir, "results": results}


def test_stage1_entries_are_complete_and_keyed(staged_run):
    stage1 = staged_run["results"]["stage1"]
    assert set(stage1) == {"rgb", "ndvi"}
    for modality, result in stage1.items():
        directory = Path(result["checkpoint"]).parents[1]
        assert directory.parent == staged_run["cache"] / "stage1"
        assert directory.name == f"{modality}-{result['stage1_key']}"
        marker = json.loads((directory / staged.MARKER).read_text(),
                            parse_constant=lambda c: pytest.fail(f"{c} in the marker: not strict JSON"))
        assert marker["stage1_key"] == result["stage1_key"] and not result["reused"]
        assert "segm_AP50" in marker["test"]
        assert torch.load(result["checkpoint"], weights_only=False)["rts_thaw"]["modalities"] == [modality]
    assert stage1["rgb"]["stage1_key"] != stage1["ndvi"]["stage1_key"]


def test_stage2_keeps_stage1_encoders_frozen_and_writes_the_table(staged_run):
    results = staged_run["results"]
    stage2 = results["stage2"]
    assert stage2["params/trainable"] < stage2["params/total"]
    for checkpoint in (stage2["best_checkpoint"], stage2["last_checkpoint"]):
        for modality in ("rgb", "ndvi"):
            before = encoder_state(results["stage1"][modality]["checkpoint"], modality)
            after = encoder_state(checkpoint, modality)
            assert before.keys() == after.keys() and before
            assert all(torch.equal(before[k], after[k]) for k in before), modality
    info = torch.load(stage2["best_checkpoint"], weights_only=False)["rts_thaw"]
    assert info["modalities"] == ["rgb", "ndvi"] and info["tile_size"] == 64
    assert set(info["norm_stats"]["mean"]) == {"rgb", "ndvi"}
    rows = json.loads((staged_run["run_dir"] / "final_table.json").read_text())
    assert [r["model"] for r in rows] == ["stage1 rgb", "stage1 ndvi", "stage2 rgb+ndvi"]
    assert (staged_run["run_dir"] / "final_table.csv").read_text().count("\n") == 4
    for row in rows:
        assert row["trainable_params"] > 0 and row["wall_s"] > 0 and 0 <= row["segm_AP50"] <= 100  # percent
    written = json.loads((staged_run["run_dir"] / "results.json").read_text())  # stage 2's
    assert written["score_unit"] == "percent"
    assert written["test"]["segm_AP50"] == pytest.approx(stage2["test"]["segm_AP50"])
    assert rows[-1]["segm_AP50"] == pytest.approx(stage2["test"]["segm_AP50"])  # the table: the same numbers


def test_second_run_reuses_stage1_and_separate_unimodal_job_finds_it(staged_run, tiny_world_config, tmp_path):
    markers = {m: Path(r["checkpoint"]).parents[1] / staged.MARKER for m, r in staged_run["results"]["stage1"].items()}
    mtimes = {m: p.stat().st_mtime_ns for m, p in markers.items()}
    # The same stage-1 settings through the stand-alone stage-1 job of a sweep:
    job = compose_train(tiny_overrides(tiny_world_config, staged_run["cache"], experiment="unimodal",
                                       modalities=["ndvi"], epochs=1) + ["training.stage1_cache=true"])
    result = train(job, tmp_path / "ndvi_job")
    assert result["reused"] is True
    assert result["checkpoint"] == staged_run["results"]["stage1"]["ndvi"]["checkpoint"]
    assert {m: p.stat().st_mtime_ns for m, p in markers.items()} == mtimes  # nothing retrained


def test_interrupted_stage1_entry_resumes_whichever_run_asks_for_it(staged_run, tiny_world_config, tmp_path):
    """A stage-1 job of a sweep (unimodal, cache on) stopped before storing its entry; the staged
    run that needs the same model resumes it, although its other settings (its experiment, its
    name) differ: the entry's own key is what a resumed checkpoint must match."""
    cache = tmp_path / "cache"
    job = compose_train(tiny_overrides(tiny_world_config, cache, experiment="unimodal", modalities=["rgb"], epochs=1)
                        + ["training.stage1_cache=true", "name=stage1_job"])
    first = train(job, tmp_path / "rgb_job")
    entry = Path(first["checkpoint"]).parents[1]
    (entry / staged.MARKER).unlink()  # as if stopped after its last checkpoint
    staged_cfg = compose_train(tiny_overrides(tiny_world_config, cache, experiment="staged_fusion",
                                              modalities=["rgb", "ndvi"], epochs=1))
    resumed = staged.ensure_stage1(staged.stage1_config(staged_cfg, "rgb"))
    assert resumed["reused"] is False and Path(resumed["checkpoint"]).parents[1] == entry
    assert (entry / staged.MARKER).is_file()
    assert encoder_state(resumed["checkpoint"], "rgb").keys() == encoder_state(first["checkpoint"], "rgb").keys()


def test_changed_stage1_setting_trains_anew(staged_run, tmp_path):
    base = compose_train(staged_run["overrides"])
    changed = compose_train(staged_run["overrides"] + ["training.optimizer.lr=0.0005"])
    same_device = compose_train(staged_run["overrides"] + ["trainer.accelerator=cpu", "logger=none",
                                                            "training.stage2.max_epochs=3"])
    key = lambda cfg: staged.stage1_key(staged.stage1_config(cfg, "rgb"))
    assert key(changed) != key(base)
    assert key(same_device) == key(base)  # device, logger and stage-2 settings are not stage-1 settings
    result = staged.ensure_stage1(staged.stage1_config(changed, "rgb"))
    assert result["reused"] is False
    assert Path(result["checkpoint"]).parents[1] != Path(staged_run["results"]["stage1"]["rgb"]["checkpoint"]).parents[1]


def test_bad_stage1_entries_are_reported_never_used(staged_run, tmp_path):
    source = Path(staged_run["results"]["stage1"]["rgb"]["checkpoint"]).parents[1]
    key = staged_run["results"]["stage1"]["rgb"]["stage1_key"]
    entry = tmp_path / source.name
    shutil.copytree(source, entry)
    assert staged.load_stage1(entry, key)["checkpoint"].startswith(str(entry))
    marker = json.loads((entry / staged.MARKER).read_text())
    marker["test"]["segm_APl"] = None  # an undefined metric, as the marker stores it
    (entry / staged.MARKER).write_text(json.dumps(marker))
    assert math.isnan(staged.load_stage1(entry, key)["test"]["segm_APl"])  # NaN again, as a fresh result
    with pytest.raises(staged.Stage1Error, match="another configuration"):
        staged.load_stage1(entry, "0123456789ab")
    checkpoint = entry / json.loads((entry / staged.MARKER).read_text())["checkpoint"]
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(staged.Stage1Error, match="corrupt"):
        staged.load_stage1(entry, key)
    checkpoint.unlink()
    with pytest.raises(staged.Stage1Error, match="missing"):
        staged.load_stage1(entry, key)
    (entry / staged.MARKER).write_text("{not json")
    with pytest.raises(staged.Stage1Error, match="corrupt"):
        staged.load_stage1(entry, key)


def test_stage1_entries_of_older_code_are_not_reused(staged_run, tmp_path, monkeypatch):
    """Older code stored test scores as fractions. The unit is part of the stage-1 key, so such an
    entry is another entry (trained anew, never mixed into a table in percent), and a marker
    without the unit is refused where it is found."""
    cfg = staged.stage1_config(compose_train(staged_run["overrides"]), "rgb")
    current = Path(staged_run["results"]["stage1"]["rgb"]["checkpoint"]).parents[1]
    assert staged.stage1_dir(cfg) == current
    assert json.loads((current / staged.MARKER).read_text())["score_unit"] == "percent"
    with monkeypatch.context() as m:
        m.setattr(staged, "SCORE_UNIT", "fraction")
        assert staged.stage1_dir(cfg) != current and staged.stage1_key(cfg) != staged_run["results"]["stage1"]["rgb"]["stage1_key"]

    entry = tmp_path / current.name  # the current entry, its marker rewritten as older code wrote it
    shutil.copytree(current, entry)
    marker = json.loads((entry / staged.MARKER).read_text())
    del marker["score_unit"]
    marker["test"] = {k: v / 100 if isinstance(v, float) else v for k, v in marker["test"].items()}
    (entry / staged.MARKER).write_text(json.dumps(marker))
    with pytest.raises(staged.Stage1Error, match=r"stage1.json holds test scores in fractions, not percent .*delete"):
        staged.load_stage1(entry, marker["stage1_key"])


def test_evaluate_reproduces_the_test_metrics(staged_run):
    stage2 = staged_run["results"]["stage2"]
    metrics = evaluate_checkpoint(stage2["best_checkpoint"], trainer_kwargs={"accelerator": "cpu",
                                                                           "limit_test_batches": 1,
                                                                           "enable_progress_bar": False})
    for name, value in stage2["test"].items():
        assert (math.isnan(value) and math.isnan(metrics[name])) or metrics[name] == pytest.approx(value, abs=1e-6), name


def test_evaluate_command_writes_the_metrics(staged_run, tiny_world_config, tmp_path):
    stage2 = staged_run["results"]["stage2"]
    output = tmp_path / "metrics.json"
    same_world = f"path={tiny_world_config['path']}"  # a data override that changes nothing
    done = subprocess.run(
        [sys.executable, "-m", "rts_thaw.evaluate", f"ckpt_path={stage2['best_checkpoint']}", f"output={output}",
         "trainer.accelerator=cpu", "+trainer.limit_test_batches=1", f"paths.log_dir={tmp_path}/outputs",
         f"data_overrides=['{same_world}']"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(output.read_text())
    assert written["split"] == "test" and written["score_unit"] == "percent"
    assert written["data_overrides"] == [same_world]
    assert written["metrics"]["segm_AP50"] == pytest.approx(stage2["test"]["segm_AP50"], abs=1e-6)
    assert "segm_AP50" in done.stdout


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(ValueError, match="not an rts_thaw training checkpoint"):
        evaluate_checkpoint(bogus)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "missing.ckpt")


def test_fused_model_runs_without_an_auxiliary_modality(staged_run):
    """A scene without NDVI: the fused model leaves NDVI's term out, which is not the same as
    feeding it zeros; evaluation and the report run it that way."""
    from rts_thaw.core.checkpoints import load_checkpoint
    from rts_thaw.models.checkpoint import detector_from_checkpoint

    stage2 = staged_run["results"]["stage2"]
    detector = detector_from_checkpoint(load_checkpoint(stage2["best_checkpoint"])).eval()
    torch.manual_seed(0)
    images = {"rgb": torch.randn(2, 3, 64, 64), "ndvi": torch.randn(2, 1, 64, 64)}
    with torch.no_grad():
        absent = detector.extract_features({"rgb": images["rgb"]})
        flagged = detector.extract_features(images, {"ndvi": torch.tensor([False, False])})
        zeros = detector.extract_features({**images, "ndvi": torch.zeros(2, 1, 64, 64)})
    for level in absent:
        torch.testing.assert_close(absent[level], flagged[level])
    assert not all(torch.allclose(absent[lv], zeros[lv]) for lv in absent), "a missing modality must not be zeros"

    metrics = evaluate_checkpoint(stage2["best_checkpoint"], missing_modalities=["ndvi"],
                                  trainer_kwargs={"accelerator": "cpu", "limit_test_batches": 1,
                                                  "enable_progress_bar": False})
    assert set(metrics) == set(stage2["test"])
    with pytest.raises(ValueError, match=r"missing_modalities \['dem'\] are not modalities of this checkpoint"):
        evaluate_checkpoint(stage2["best_checkpoint"], missing_modalities=["dem"])


def test_report_adds_rows_of_fused_models_without_a_modality(staged_run, monkeypatch):
    from rts_thaw.reporting import missing
    from rts_thaw.reporting.collect import Run
    from rts_thaw.reporting.tables import configuration_rows

    run_dir = staged_run["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    run = Run(overrides=("+experiment=staged_fusion", "seed=0"), run_dir=run_dir, status="finished",
              results=results, choices={"model/fusion": "residual_cross_attention", "model": "cascade_mvit"})
    single = Run(overrides=("+experiment=unimodal", "seed=0"), run_dir=run_dir, status="finished",
                 results=results, choices={"model/fusion": "none", "model": "cascade_mvit"})
    # A stacked model trained without modality dropout cannot map without NDVI: no row either.
    stacked = Run(overrides=("+experiment=data_level_fusion", "seed=0"), run_dir=run_dir, status="finished",
                  results=results, choices={"model/fusion": "data_level", "model": "cascade_mvit"},
                  config=OmegaConf.create({"training": {"modality_dropout": 0.0}}))
    extra = missing.missing_modality_runs([run, single, stacked], ["ndvi", "nir"])  # no nir in this run: no row
    assert [r.overrides[-1] for r in extra] == ["missing_at_test=ndvi"]
    assert extra[0].results["modalities"] == ["rgb"]
    cached = json.loads((run_dir / "missing_ndvi.json").read_text())
    assert cached["missing_modalities"] == ["ndvi"] and set(cached["metrics"]) == set(results["test"])
    rows = configuration_rows([run, *extra])
    assert [(row["configuration"], row["modalities"]) for row in rows] == [
        ("(base)", "rgb+ndvi"), ("missing_at_test=ndvi", "rgb")]
    # Computed once: the second report reads the kept metrics.
    monkeypatch.setattr("rts_thaw.training.evaluation.evaluate_checkpoint",
                        lambda *a, **k: pytest.fail("evaluated again"))
    assert missing.missing_modality_runs([run], ["ndvi"])[0].results["test"].keys() == results["test"].keys()
    assert cached["score_unit"] == "percent"
    # Kept metrics of older code (fractions, no score_unit) are read in percent.
    old = {k: v for k, v in cached.items() if k != "score_unit"}
    old["metrics"] = {k: 0.25 for k in cached["metrics"]}
    (run_dir / "missing_ndvi.json").write_text(json.dumps(old))
    assert set(missing.missing_modality_runs([run], ["ndvi"])[0].results["test"].values()) == {25.0}


def test_report_scores_every_run_on_other_test_data(staged_run, tmp_path, monkeypatch):
    """`report --test-data`: every finished run's checkpoint is scored on the test split of its
    data so changed (here another world), once, and so are the rows without a modality."""
    from rts_thaw.data.synthetic import ensure_world
    from rts_thaw.reporting import missing, rescore
    from rts_thaw.reporting.collect import Run

    other_world = ensure_world(tmp_path, scenes=4, size=256, seed=8)  # the tiny world's kind, other scenes
    test_data = (f"path={other_world}",)
    run_dir = staged_run["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    run = Run(overrides=("+experiment=staged_fusion", "seed=0"), run_dir=run_dir, status="finished",
              results=results, choices={"model/fusion": "gated_local_attention", "model": "cascade_mvit"})
    unfinished = Run(overrides=("+experiment=staged_fusion", "seed=1"))
    scored, still_unfinished = rescore.runs_scored_on([run, unfinished], test_data)
    assert still_unfinished is unfinished
    expected = evaluate_checkpoint(results["best_checkpoint"], data_overrides=list(test_data),
                                   trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    assert scored.results["test"] == pytest.approx(expected, nan_ok=True)
    assert scored.results["test"] != pytest.approx(results["test"], nan_ok=True), "scored on its own test split"
    kept = json.loads(rescore.kept_scores_file(run_dir, None, test_data).read_text())
    assert kept["data_overrides"] == list(test_data) and kept["missing_modalities"] == []

    [without] = missing.missing_modality_runs([scored], ["ndvi"], test_data)
    kept_without = rescore.kept_scores_file(run_dir, "ndvi", test_data)
    assert kept_without.name == f"test_on_{rescore.test_data_key(test_data)}_missing_ndvi.json"
    assert json.loads(kept_without.read_text())["missing_modalities"] == ["ndvi"]
    # Kept: a second report evaluates nothing.
    monkeypatch.setattr("rts_thaw.training.evaluation.evaluate_checkpoint",
                        lambda *a, **k: pytest.fail("evaluated again"))
    assert rescore.runs_scored_on([run], test_data)[0].results["test"] == pytest.approx(expected, nan_ok=True)
    assert missing.missing_modality_runs([scored], ["ndvi"], test_data)[0].results["test"] == without.results["test"]

    # Scored anew when the data it was scored on is not what would be read now: another world
    # in its place (a changed generator names another folder) or its scene list rewritten.
    calls = []
    monkeypatch.setattr("rts_thaw.training.evaluation.evaluate_checkpoint",
                        lambda *a, **k: calls.append(k["data_overrides"]) or expected)
    kept_file = rescore.kept_scores_file(run_dir, None, test_data)
    kept_file.write_text(json.dumps({**kept, "test_data": str(tmp_path / "synthetic_old" / "scenes.yaml")}))
    rescore.runs_scored_on([run], test_data)
    assert calls == [list(test_data)] and json.loads(kept_file.read_text())["test_data"] == str(other_world)
    later = time.time() + 60
    os.utime(other_world, (later, later))
    rescore.runs_scored_on([run], test_data)
    assert len(calls) == 2


def test_data_overrides_change_the_checkpoints_data_config_and_refuse_unknown_keys():
    from rts_thaw.training.evaluation import data_config_for

    info = {"modalities": ["rgb", "ndvi"], "tile_size": 128, "config": {"data": {
        "path": {"_target_": "rts_thaw.data.synthetic.ensure_world", "seed": 0, "scenes": 20}, "modalities": ["rgb"]}}}
    data = data_config_for(info, None, ["ndvi"], ["path.seed=1", "path.scenes=100"])
    assert (data.path.seed, data.path.scenes, list(data.modalities), data.tile_size) == (1, 100, ["rgb"], 128)
    assert info["config"]["data"]["path"]["seed"] == 0, "the checkpoint's config is not changed"
    with pytest.raises(ValueError, match=r"'path.sed=1'.*the data config has no 'path.sed'"):
        data_config_for(info, None, overrides=["path.sed=1"])
    with pytest.raises(ValueError, match=r"'data.path.seed=1'.*key inside the data config"):
        data_config_for(info, None, overrides=["data.path.seed=1"])
    with pytest.raises(ValueError, match=r"'path.seed'.*expected key=value"):
        data_config_for(info, None, overrides=["path.seed"])


def test_the_data_path_of_a_generated_world_names_the_generator(tmp_path, monkeypatch):
    from rts_thaw.data import synthetic
    from rts_thaw.data.scene_sources import data_path

    cfg = OmegaConf.create({"path": {"_target_": "rts_thaw.data.synthetic.ensure_world", "root": str(tmp_path),
                                     "scenes": 1, "size": 96}})
    first = data_path(cfg)
    assert Path(first).is_file() and data_path(cfg) == first
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert data_path(cfg) != first
    assert data_path(OmegaConf.create({"path": first})) == first


def test_stage1_key_follows_the_generated_world_not_only_its_config(tmp_path, monkeypatch):
    """Same config, different world (a preset changed in code): the stage-1 models of the
    old world must not be reused."""
    from rts_thaw.data import synthetic

    overrides = ["+experiment=unimodal", f"paths.cache_dir={tmp_path}", "data.path.scenes=1", "data.path.size=96",
                 "data.path.world=paper_like"]
    key = staged.stage1_key(staged.stage1_config(compose_train(overrides), "rgb"))
    assert key == staged.stage1_key(staged.stage1_config(compose_train(overrides), "rgb"))  # stable
    monkeypatch.setitem(synthetic.WORLDS, "paper_like", {**synthetic.WORLDS["paper_like"], "rgb_separability": 0.5})
    assert staged.stage1_key(staged.stage1_config(compose_train(overrides), "rgb")) != key


def test_the_stacked_stage1_model_learns_modality_dropout_the_unimodal_ones_do_not(tmp_path):
    """With modality dropout, the data_level model of a stacked query is trained with it too (its
    encoder must meet mean-filled channels), under another key; a unimodal model has nothing to
    withhold and keeps the key of the entry trained without it."""
    overrides = ["+experiment=staged_fusion", f"paths.cache_dir={tmp_path}"]  # the default: the stacked query
    plain, dropout = compose_train([*overrides, "training.modality_dropout=0"]), compose_train(overrides)
    stacked = staged.stage1_config(dropout, "stacked")
    assert stacked.training.modality_dropout == dropout.training.modality_dropout > 0  # the default's
    assert staged.stage1_key(stacked) != staged.stage1_key(staged.stage1_config(plain, "stacked"))
    assert staged.stage1_config(dropout, "ndvi").training.modality_dropout == 0.0
    assert staged.stage1_key(staged.stage1_config(dropout, "ndvi")) == staged.stage1_key(
        staged.stage1_config(plain, "ndvi"))


def test_stage2_freezes_the_encoders_unless_asked_to_fine_tune_them(tmp_path):
    overrides = ["+experiment=staged_fusion", f"paths.cache_dir={tmp_path}", "model/fusion=gated_local_attention"]
    checkpoints = {"rgb": "rgb.ckpt", "ndvi": "ndvi.ckpt", "nir": "nir.ckpt"}
    frozen = staged.stage2_config(compose_train(overrides), checkpoints)
    assert frozen.model.encoder.frozen is True and frozen.model.init_from == "rgb.ckpt"
    tuned = staged.stage2_config(compose_train([*overrides, "training.stage2.freeze_encoders=false"]), checkpoints)
    assert tuned.model.encoder.frozen is False and dict(tuned.model.encoder.weights) == checkpoints


def test_stacked_query_stages_the_data_level_model_and_the_auxiliary_ones(tiny_world_config, tmp_path):
    """The default, stacked_gated_local_attention with modality dropout: stage 1 trains the
    data_level model ("stacked", with the dropout) and one model per auxiliary modality, never an
    RGB one; a data_level job with the same dropout and the cache on finds the stacked entry;
    stage 2 starts from the data_level model's heads, keeps every encoder frozen, and maps
    without NDVI."""
    from rts_thaw.core.checkpoints import load_checkpoint
    from rts_thaw.models.checkpoint import detector_from_checkpoint

    cache = tmp_path / "cache"
    overrides = tiny_overrides(tiny_world_config, cache, experiment="staged_fusion", modalities=["rgb", "ndvi"],
                               epochs=1)
    default_dropout = compose_train(overrides).training.modality_dropout
    results = train(compose_train(overrides), tmp_path / "run")
    stage1 = results["stage1"]
    assert list(stage1) == ["stacked", "ndvi"]
    stacked_dir = Path(stage1["stacked"]["checkpoint"]).parents[1]
    assert stacked_dir.name == f"stacked-{stage1['stacked']['stage1_key']}"
    assert torch.load(stage1["stacked"]["checkpoint"], weights_only=False)["rts_thaw"]["modalities"] == ["rgb", "ndvi"]
    for key in ("stacked", "ndvi"):
        before = encoder_state(stage1[key]["checkpoint"], key)
        after = encoder_state(results["stage2"]["best_checkpoint"], key)
        assert before and all(torch.equal(before[k], after[k]) for k in before), key
    rows = json.loads((tmp_path / "run" / "final_table.json").read_text())
    assert [r["model"] for r in rows] == ["stage1 stacked", "stage1 ndvi", "stage2 rgb+ndvi"]
    config = compose_train(overrides)
    assert staged.stage2_config(config, {"stacked": "s.ckpt", "ndvi": "n.ckpt"}).model.init_from == "s.ckpt"
    stacked_info = torch.load(stage1["stacked"]["checkpoint"], weights_only=False)["rts_thaw"]
    assert stacked_info["config"]["training"]["modality_dropout"] == default_dropout > 0
    fused = detector_from_checkpoint(load_checkpoint(results["stage2"]["best_checkpoint"]))
    assert fused.learned_missing and fused.optional_modalities == ["ndvi"]

    marker = stacked_dir / staged.MARKER
    mtime = marker.stat().st_mtime_ns
    data_level = tiny_overrides(tiny_world_config, cache, experiment="data_level_fusion", modalities=["rgb", "ndvi"],
                                epochs=1) + ["training.stage1_cache=true", f"training.modality_dropout={default_dropout}",
                                             "name=stacked_job"]
    reused = train(compose_train(data_level), tmp_path / "data_level_job")
    assert reused["reused"] and reused["stage1_key"] == stage1["stacked"]["stage1_key"]
    assert marker.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"stores a stage-1 model, one encoder.*encoders \['stacked', 'ndvi'\]"):
        train(compose_train(tiny_overrides(tiny_world_config, cache, experiment="end_to_end_fusion",
                                           modalities=["rgb", "ndvi"], epochs=1) + ["training.stage1_cache=true"]),
              tmp_path / "refused")
