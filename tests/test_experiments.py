"""Every experiment and every config group option composes; every experiment runs a fast_dev_run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rts_thaw.train import train

from tiny_run import compose_train, tiny_overrides

EXPERIMENTS = ["unimodal", "staged_fusion", "end_to_end_fusion", "data_level_fusion",
               "maskrcnn_r50", "maskrcnn_mvit"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_its_settings(experiment, tmp_path):
    cfg = compose_train([f"+experiment={experiment}", f"paths.cache_dir={tmp_path}"])
    assert cfg.name == experiment
    resolved = OmegaConf.to_container(cfg.model, resolve=True)
    gated = "rts_thaw.models.local_fusion.GatedLocalFusion"
    expected_fusion = {"staged_fusion": gated, "end_to_end_fusion": gated,
                       "data_level_fusion": "rts_thaw.models.fusion.stacked_input"}.get(
                           experiment, "rts_thaw.models.fusion.single_modality")
    assert resolved["fusion"]["_target_"] == expected_fusion
    assert cfg.training.staged == (experiment == "staged_fusion")
    expected_encoder = "resnet50" if experiment == "maskrcnn_r50" else "mvitv2_micro"
    assert resolved["encoder"]["name"] == expected_encoder
    stages = len(resolved["heads"]["roi"]["iou_thresholds"])
    assert stages == (1 if experiment.startswith("maskrcnn") else 3)
    assert resolved["img_size"] == cfg.data.tile_size


def test_unimodal_modality_is_selectable(tmp_path):
    cfg = compose_train(["+experiment=unimodal", "data.modalities=[ndvi]", f"paths.cache_dir={tmp_path}"])
    assert list(cfg.data.modalities) == ["ndvi"]


@pytest.mark.parametrize("option", ["default", "cpu", "gpu", "ddp"])
def test_trainer_options_compose_and_instantiate(option, tmp_path):
    cfg = compose_train([f"trainer={option}", f"paths.cache_dir={tmp_path}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    needs_gpus = {"gpu": 1, "ddp": 2}.get(option, 0)
    if torch.cuda.device_count() < needs_gpus:
        # Lightning refuses a GPU trainer without GPUs; the settings are still checked.
        assert cfg.trainer.accelerator == "gpu"
        assert cfg.trainer.devices == needs_gpus
        return
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
    expected = "cpu" if option == "cpu" or not torch.cuda.is_available() else "cuda"
    assert type(trainer.accelerator).__name__.lower().startswith(expected)


@pytest.mark.parametrize("option", ["csv", "wandb", "none"])
def test_logger_options_compose_and_instantiate(option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train([f"logger={option}", f"paths.cache_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    loggers = {name: instantiate(c) for name, c in cfg.logger.items()}
    names = {type(lg).__name__ for lg in loggers.values()}
    assert names == {"csv": {"CSVLogger"}, "wandb": {"CSVLogger", "WandbLogger"}, "none": set()}[option]
    if option == "wandb":
        assert cfg.logger.wandb.group == cfg.name


def test_every_data_option_composes(tmp_path):
    data_dir = Path(__file__).resolve().parents[1] / "conf" / "data"
    for option in sorted(p.stem for p in data_dir.glob("*.yaml")):
        cfg = compose_train([f"data={option}", f"paths.cache_dir={tmp_path}"])
        assert cfg.data._target_.endswith("RTSDataModule"), option


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_fast_dev_run(experiment, tiny_world_config, tmp_path):
    cfg = compose_train(tiny_overrides(tiny_world_config, tmp_path / "cache", experiment=experiment))
    results = train(cfg, tmp_path / "run")
    final = results["stage2"] if experiment == "staged_fusion" else results
    assert final["global_step"] == 1
    assert set(final["test"]) >= {"segm_AP50", "bbox_AP50"}
    table = json.loads((tmp_path / "run" / "final_table.json").read_text())
    assert len(table) == (4 if experiment == "staged_fusion" else 1)
    # A smoke test never fills the shared stage-1 cache.
    assert not (tmp_path / "cache" / "stage1").exists() or not any((tmp_path / "cache" / "stage1").iterdir())


def test_entry_point_finds_configs_outside_the_repository(tmp_path):
    """`python -m rts_thaw.train` composes from the installed package, from any directory."""
    env = {**os.environ, "RTS_THAW_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "rts_thaw.train", "+experiment=staged_fusion", "--cfg", "job"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.name == "staged_fusion" and cfg.training.staged is True
    assert cfg.model.fusion._target_ == "rts_thaw.models.local_fusion.GatedLocalFusion"
    assert cfg.model.fusion.reference == "stacked" and cfg.training.modality_dropout == 0.25
    # a 12-epoch stage 1 (the stacked encoder trained with dropout needs it), a 6-epoch stage 2
    assert (cfg.trainer.max_epochs, cfg.training.stage2.max_epochs) == (12, 6)


# README: stage-1 models trained as separate jobs (one SLURM task each) with these overrides
STAGE1_JOBS = {"ndvi": ["+experiment=unimodal", "data.modalities=[ndvi]"],
               "nir": ["+experiment=unimodal", "data.modalities=[nir]"],
               "stacked": ["+experiment=data_level_fusion", "training.modality_dropout=0.25"]}


def test_stage1_jobs_run_apart_are_the_ones_staged_fusion_looks_for(tmp_path):
    """The README's separate stage-1 jobs must store what `staged_fusion` reuses, not a model it
    would train again (a 6-epoch job misses the 12-epoch key)."""
    from rts_thaw.training import staged

    fused = compose_train(["+experiment=staged_fusion", f"paths.cache_dir={tmp_path}"])
    wanted = {e: staged.stage1_key(staged.stage1_config(fused, e)) for e in staged.stage1_encoders(fused)}
    assert sorted(wanted) == sorted(STAGE1_JOBS)
    for encoder, overrides in STAGE1_JOBS.items():
        job = compose_train(overrides + ["trainer.max_epochs=12", "training.stage1_cache=true",
                                         f"paths.cache_dir={tmp_path}"])
        assert staged.stage1_encoders(job) == [encoder]
        assert staged.stage1_key(staged.stage1_config(job, encoder)) == wanted[encoder], encoder
        too_short = compose_train(overrides + ["training.stage1_cache=true", f"paths.cache_dir={tmp_path}"])
        assert staged.stage1_key(staged.stage1_config(too_short, encoder)) != wanted[encoder], encoder


@pytest.mark.parametrize("experiment", ["paper_rgb", "paper_fusion"])
def test_paper_scale_experiments_set_the_paper_model_for_a_gpu(experiment, tmp_path):
    cfg = compose_train([f"+experiment={experiment}", f"paths.cache_dir={tmp_path}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["encoder"]["name"] == "mvitv2_tiny" and model["encoder"]["pretrained"] is True
    assert len(model["heads"]["roi"]["iou_thresholds"]) == 3 and model["heads"]["roi"]["batch_size_per_image"] == 512
    assert cfg.data.tile_size == 512 and model["img_size"] == 512
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_epochs == 50
    assert cfg.training.staged == (experiment == "paper_fusion")
    assert list(cfg.data.modalities) == (["rgb", "ndvi", "nir"] if experiment == "paper_fusion" else ["rgb"])


@pytest.mark.slow
def test_paper_scale_model_trains_a_step_on_the_cpu(tiny_world_config, tmp_path):
    """The paper-scale model itself (MViTv2-T, detectron2-scale cascade), one step on small tiles."""
    overrides = tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="paper_rgb")
    cfg = compose_train(overrides + ["model.encoder.pretrained=false"])
    assert cfg.model.encoder.name == "mvitv2_tiny" and cfg.trainer.accelerator == "cpu"
    results = train(cfg, tmp_path / "run")
    assert results["global_step"] == 1 and results["params/total"] > 20e6
