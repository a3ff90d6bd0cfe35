"""Every job of every sweep config composes and builds, and the launchers produce the
SLURM request a cluster user expects, without running anything."""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rts_thaw.report import write_report
from rts_thaw.reporting.jobs import configuration_overrides, expand_jobs
from rts_thaw.models.encoders import check_tile_size
from rts_thaw.training.single_run import build_detector

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps" / "sweep"
SWEEPS = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
# Channels per modality of the synthetic world (rgb 3 bands; ndvi, nir, dem 1 each). The
# model is built from this dict, as train builds it from datamodule.modality_channels.
CHANNELS = {"rgb": 3, "ndvi": 1, "nir": 1, "dem": 1}
# A tiny, fast run: micro MViTv2, light heads, a 3-scene 128 px world, 64 px tiles, 2 steps.
TINY = [
    "trainer=cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "data.tile_size=64", "data.batch_size=2", "logger=csv",
    "data.path.scenes=3", "data.path.size=128",
]


@pytest.fixture(scope="module")
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rts_thaw.conf", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
    composed.cache_clear()


@functools.lru_cache(maxsize=None)
def composed(job: tuple[str, ...]):
    """A job's config with Hydra's part (runtime choices), composed once per test module."""
    return compose("train", overrides=list(job), return_hydra_config=True)


def sweep_jobs(name: str, extra: list[str] = ()) -> list[list[str]]:
    """The jobs `python -m rts_thaw.train -m +sweep=<name> <extra>` launches."""
    primary = compose("train", overrides=[f"+sweep={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(primary.hydra.sweeper.params)
    return expand_jobs([f"+sweep={name}", *extra], params)


# Models already built, by (model, fusion, number of modalities): the structure of a
# detector depends on nothing else, and building one takes seconds on a CPU.
_BUILT: set = set()


def test_sweeps_exist():
    assert {"table1_backbones", "table2_fusion", "dem", "stage1"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_the_sweep_composes_and_builds(hydra_conf, name, tmp_path):
    jobs = sweep_jobs(name)
    assert len(jobs) >= 3
    configurations = set()
    for job in jobs:
        cfg = composed(tuple(job))
        choices = cfg.hydra.runtime.choices
        assert cfg.name == name, f"{job}: the sweep's name must win, so every job shares one group/dir"
        for override in job:
            key, value = override.lstrip("+").split("=", 1)
            if key == "data.modalities":
                assert list(cfg.data.modalities) == yaml.safe_load(value)
        modalities = list(cfg.data.modalities)
        if cfg.training.staged:
            assert "rgb" in modalities
        check_tile_size(int(cfg.data.tile_size), cfg.model.encoder, cfg.model.get("img_size"))
        OmegaConf.to_container(cfg.model, resolve=True)
        instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
        structure = (choices.model, choices["model/fusion"], len(modalities))
        if structure not in _BUILT:
            # The model of this job, built the way the entry point builds it.
            data = SimpleNamespace(modality_channels={m: CHANNELS[m] for m in modalities})
            detector = build_detector(cfg, data)
            assert set(detector.modalities) == set(modalities)
            _BUILT.add(structure)
        configurations.add(tuple(sorted(configuration_overrides(job))))
    assert len(configurations) == len(jobs), "two jobs of one sweep run the same configuration"


def test_table2_grid(hydra_conf):
    jobs = sweep_jobs("table2_fusion")
    assert len(jobs) == 27  # 4 feature-level fusions x (staged, end to end) + data level, x 3 modality sets
    seen = set()
    for job in jobs:
        cfg = composed(tuple(job))
        seen.add((cfg.hydra.runtime.choices["model/fusion"], bool(cfg.training.staged), tuple(cfg.data.modalities)))
    fusions = {"concat_conv", "cross_attention", "residual_cross_attention", "gated_local_attention"}
    sets = {("rgb", "ndvi"), ("rgb", "nir"), ("rgb", "ndvi", "nir")}
    expected = {(f, s, m) for f in fusions for s in (True, False) for m in sets}
    expected |= {("data_level", False, m) for m in sets}
    assert seen == expected


def test_fusion_table_grid(hydra_conf):
    jobs = sweep_jobs("fusion_table", ["data.path.world=paper_like"])
    seen = []
    for job in jobs:
        cfg = composed(tuple(job))
        assert cfg.data.path.world == "paper_like" and cfg.data.path.scenes == 20
        modalities = tuple(cfg.data.modalities)
        if cfg.hydra.runtime.choices["model/fusion"] in ("none", "data_level"):  # they fill the stage-1 cache
            assert cfg.training.stage1_cache and not cfg.training.staged
            assert len(modalities) == 1 or modalities == ("rgb", "ndvi", "nir")
        else:
            assert modalities == ("rgb", "ndvi", "nir")
        seen.append((cfg.hydra.runtime.choices["model/fusion"], bool(cfg.training.staged), modalities,
                     cfg.training.modality_dropout))
    assert seen[:4] == [("none", False, (m,), 0.0) for m in ("rgb", "ndvi", "nir")] + [  # first: stage 2 reuses them
        ("data_level", False, ("rgb", "ndvi", "nir"), 0.0)]
    fusions = ("concat_conv", "cross_attention", "residual_cross_attention", "gated_local_attention")
    assert {(f, s) for f, s, _, d in seen if f in fusions and not d} == {(f, s) for f in fusions for s in (True, False)}
    assert ("gated_local_attention", True, ("rgb", "ndvi", "nir"), 0.25) in seen
    assert ("stacked_gated_local_attention", True, ("rgb", "ndvi", "nir"), 0.0) in seen
    assert ("stacked_gated_local_attention", True, ("rgb", "ndvi", "nir"), 0.25) in seen


def test_seeds_repeat_any_sweep(hydra_conf):
    jobs = sweep_jobs("table1_backbones", ["seed=0,1,2"])
    assert len(jobs) == 9
    assert len({tuple(sorted(configuration_overrides(j))) for j in jobs}) == 3
    assert {composed(tuple(j)).seed for j in jobs[:3]} == {0, 1, 2}


def test_reduced_grid_from_the_command_line(hydra_conf):
    jobs = sweep_jobs("table2_fusion", ["+fusion_training=residual_cross_attention_staged,concat_conv_staged",
                                        "data.modalities=[rgb,ndvi]"])
    assert len(jobs) == 2


def _sbatch_script(launcher_cfg, tmp_path: Path) -> str:
    """The sbatch script hydra-submitit-launcher would submit for this launcher config
    (the plugin's own parameter mapping: generic keys as is, the others slurm_-prefixed)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    launcher = instantiate(launcher_cfg)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "%j"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m rts_thaw.train", "uid")


def test_slurm_launcher_follows_the_trainer_for_ddp(hydra_conf, tmp_path):
    cfg = compose("train", return_hydra_config=True, overrides=[
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu", "hydra.launcher.account=permafrost", "hydra.launcher.qos=high",
        "hydra.launcher.timeout_min=720", "hydra.launcher.cpus_per_task=6", "hydra.launcher.mem_gb=200",
        "+hydra.launcher.additional_parameters.mail-type=END", "hydra.launcher.array_parallelism=4",
        "hydra.sweep.dir=" + str(tmp_path)])
    script = _sbatch_script(cfg.hydra.launcher, tmp_path)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--account=permafrost", "--qos=high", "--time=720", "--cpus-per-task=6", "--mem=200GB",
                 "--mail-type=END", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun" in script  # one task per GPU, started by srun: Lightning's DDP ranks come from SLURM
    assert cfg.hydra.launcher.array_parallelism == 4
    assert cfg.hydra.launcher.max_num_timeout > 0  # time-outs are requeued (and the run resumes)


def test_slurm_launcher_cpu_only(hydra_conf, tmp_path):
    cfg = compose("train", return_hydra_config=True, overrides=[
        "hydra/launcher=slurm", "trainer=cpu", "hydra.launcher.gpus_per_node=null",
        "hydra.sweep.dir=" + str(tmp_path)])
    script = _sbatch_script(cfg.hydra.launcher, tmp_path)
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert "#SBATCH --nodes=1\n" in script


def test_local_launcher_composes(hydra_conf):
    cfg = compose("train", return_hydra_config=True, overrides=["hydra/launcher=local"])
    assert cfg.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.slow  # a long end-to-end run: `make test` runs it, `make test-fast` does not
def test_local_launcher_runs_a_sweep_that_the_report_reads(tmp_path):
    """The same sweep mechanism without SLURM: 2 seeds of one configuration, then the report."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "RTS_THAW_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "rts_thaw.train", "-m", "+sweep=table2_fusion",
               "+fusion_training=data_level", "data.modalities=[rgb,ndvi]", "seed=1,2",
               "hydra/launcher=local", f"hydra.sweep.dir={sweep}", *TINY]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    report = write_report(sweep)
    assert [r.status for r in report["runs"]] == ["finished", "finished"]
    (row,) = report["rows"]
    assert (row["fusion"], row["modalities"], row["training"], row["seeds"]) == ("data_level", "rgb+ndvi", "end_to_end", 2)
    per_seed = [r.results["test"]["segm_AP50"] for r in report["runs"]]
    assert row["segm_AP50"] == pytest.approx(statistics.fmean(per_seed))
    assert row["segm_AP50_std"] == pytest.approx(statistics.stdev(per_seed))
    assert row["trainable_params"] > 0 and row["wall_s"] > 0


def test_expand_jobs_matches_the_basic_sweepers_order_and_strings():
    """The launch order and override strings `-m` gives (checked once against Hydra's
    BasicSweeper): the first key varies slowest, the config's params come first, a repeated
    key keeps its first place and its last values, prefixes and packages stay in the key."""
    jobs = expand_jobs(["b=x,y", "+c@pkg=range(1,3)", "a=3,4", "~d"], {"a": "1,2", "s": "[1,2],[3]"})
    assert jobs == [
        [f"a={a}", f"s={s}", f"b={b}", f"+c@pkg={c}", "~d=null"]
        for a in (3, 4) for s in ("[1,2]", "[3]") for b in "xy" for c in (1, 2)
    ]
    assert expand_jobs([]) == [[]]
    with pytest.raises(Exception, match="does not support sweep type"):
        expand_jobs(["lr=interval(0,1)"])
