"""`python -m rts_thaw.report`: tables, seed statistics, failed runs, plots, W&B group.

The sweep directory here is laid out as `rts_thaw.train -m` leaves it (multirun.yaml,
per-job .hydra/ and results.json, submitit logs); the real end-to-end sweep on SLURM
is in tests/test_slurm_sweep.py.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rts_thaw.core.json_files import write_json_atomic
from rts_thaw.report import write_report

SWEEP_PARAMS = {"+fusion_training": "concat_conv_staged,residual_cross_attention_end_to_end",
                "data.modalities": "[rgb,ndvi]"}
TASK = ["+sweep=table2_fusion", "seed=1,2"]


def _metrics(ap50: float) -> dict:
    """Test metrics in percent, as rts_thaw.train writes them."""
    test = {f"{t}_{m}": ap50 / 2 for t in ("segm", "bbox") for m in ("AP", "AP75", "APs", "APm")}
    test.update(segm_AP50=ap50, bbox_AP50=ap50 + 1.0, segm_APl=float("nan"), bbox_APl=-1.0)
    return test


def _write_job(sweep: Path, name: str, overrides: list[str], fusion: str, staged: bool,
               results: dict | None, job_id: str, wandb: bool = True) -> Path:
    run_dir = sweep / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"hydra": {"job": {"id": job_id}, "runtime": {"choices": {
        "model/fusion": fusion, "model": "cascade_mvit", "hydra/launcher": "slurm", "fusion_training": "x"}}}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    config = {"name": "table2_fusion", "data": {"modalities": ["rgb", "ndvi"]},
              "training": {"staged": staged}}
    if wandb:
        config["logger"] = {"wandb": {"project": "rts_thaw", "group": "${name}"}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """Four launched jobs: two configurations x two seeds; one job crashed."""
    sweep = tmp_path / "multirun" / "table2_fusion"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": TASK}, "sweeper": {"params": SWEEP_PARAMS}}, "name": "table2_fusion"}))
    base = ["data.modalities=[rgb,ndvi]", "+sweep=table2_fusion"]
    for seed, ap50, memory in (("1", 40.0, 900.0), ("2", 50.0, 1100.0)):
        _write_job(sweep, f"staged{seed}", ["+fusion_training=concat_conv_staged", *base, f"seed={seed}"],
                   "concat_conv", True, {
                       "score_unit": "percent", "test": _metrics(ap50), "params/trainable": 2_000_000, "params/total": 5_000_000,
                       "perf/peak_gpu_memory_mb": memory, "perf/wall_s": 60.0 * int(seed),
                       "modalities": ["rgb", "ndvi"]}, job_id=f"7_{seed}")
    _write_job(sweep, "e2e1", ["+fusion_training=residual_cross_attention_end_to_end", *base, "seed=1"],
               "residual_cross_attention", False, {
                   "score_unit": "percent", "test": _metrics(30.0), "params/trainable": 5_000_000, "params/total": 5_000_000,
                   "perf/peak_gpu_memory_mb": 2000.0, "perf/wall_s": 100.0, "modalities": ["rgb", "ndvi"]},
               job_id="7_3")
    # seed 2 of the end-to-end configuration died: a directory, no results, an error in its log.
    _write_job(sweep, "e2e2", ["+fusion_training=residual_cross_attention_end_to_end", *base, "seed=2"],
               "residual_cross_attention", False, None, job_id="7_4")
    log_dir = sweep / ".submitit" / "7_4"
    log_dir.mkdir(parents=True)
    (log_dir / "7_4_0_log.err").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory\n")
    return sweep


def test_null_metrics_of_strict_json_results_are_undefined(sweep_dir: Path):
    """results.json as rts_thaw.train writes it now: NaN stored as null."""
    results_file = sweep_dir / "staged2" / "results.json"
    results = json.loads(results_file.read_text())
    results["test"]["segm_AP50"] = math.nan
    results["perf/peak_gpu_memory_mb"] = math.inf
    write_json_atomic(results_file, results, sort_keys=True)
    assert "null" in results_file.read_text() and "NaN" not in results_file.read_text()
    staged = {row["fusion"]: row for row in write_report(sweep_dir)["rows"]}["concat_conv"]
    assert staged["seeds"] == 2
    assert staged["segm_AP50"] == pytest.approx(40.0) and staged["segm_AP50_std"] == 0.0  # seed 1 only
    assert staged["peak_memory_mb"] == pytest.approx(900.0)
    assert staged["bbox_AP50"] == pytest.approx(46.0)  # both seeds
    assert math.isnan(staged["segm_APl"])


def test_report_rows_seed_statistics_and_failures(sweep_dir: Path):
    report = write_report(sweep_dir)
    rows = {row["fusion"]: row for row in report["rows"]}
    assert set(rows) == {"concat_conv", "residual_cross_attention"}

    staged = rows["concat_conv"]
    assert (staged["training"], staged["modalities"], staged["seeds"], staged["jobs"]) == ("staged", "rgb+ndvi", 2, 2)
    assert staged["segm_AP50"] == pytest.approx(45.0)
    assert staged["segm_AP50_std"] == pytest.approx(statistics.stdev([40.0, 50.0]))
    assert staged["peak_memory_mb"] == pytest.approx(1000.0)
    assert staged["trainable_params"] == 2_000_000 and staged["wall_s"] == pytest.approx(90.0)
    assert math.isnan(staged["segm_APl"]) and math.isnan(staged["bbox_APl"])  # NaN and -1 mean undefined

    e2e = rows["residual_cross_attention"]
    assert (e2e["training"], e2e["seeds"], e2e["jobs"]) == ("end_to_end", 1, 2)
    assert e2e["segm_AP50"] == pytest.approx(30.0) and e2e["segm_AP50_std"] == 0.0

    markdown = (sweep_dir / "report" / "report.md").read_text()
    assert markdown == report["markdown"]
    assert "| cascade_mvit | concat_conv | rgb+ndvi | staged | 2/2 | 22.50 ± 3.54 | 45.00 ± 7.07 |" in markdown
    assert "3 of 4 jobs finished" in markdown
    assert "**failed** `+fusion_training=residual_cross_attention_end_to_end" in markdown
    assert "torch.OutOfMemoryError: CUDA out of memory" in markdown
    assert "`rts_thaw/table2_fusion`" in markdown  # the W&B group, resolved from ${name}

    with open(sweep_dir / "report" / "configurations.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and {r["fusion"] for r in table} == {"concat_conv", "residual_cross_attention"}
    with open(sweep_dir / "report" / "runs.csv") as handle:
        statuses = sorted(r["status"] for r in csv.DictReader(handle))
    assert statuses == ["failed", "finished", "finished", "finished"]
    for plot in ("ap50_by_fusion.png", "accuracy_vs_memory.png"):
        assert (sweep_dir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_whose_config_changed_between_them_are_not_averaged(sweep_dir: Path, caplog):
    """A sweep option edited between seeds: the same overrides, other settings. One row for
    both would average two different models silently; each version gets its own row."""
    base = ["+fusion_training=concat_conv_staged", "data.modalities=[rgb,ndvi]", "+sweep=table2_fusion"]
    later = _write_job(sweep_dir, "staged3", [*base, "seed=3"], "concat_conv", True, {
        "score_unit": "percent", "test": _metrics(90.0), "modalities": ["rgb", "ndvi"]}, job_id="7_5")
    config = yaml.safe_load((later / ".hydra" / "config.yaml").read_text())
    config["training"]["modality_dropout"] = 0.5
    config["seed"] = 3  # the seed alone never tells runs apart
    (later / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = {row["configuration"]: row for row in write_report(sweep_dir)["rows"]}
    before = rows["+fusion_training=concat_conv_staged [training.modality_dropout=(unset)]"]
    after = rows["+fusion_training=concat_conv_staged [training.modality_dropout=0.5]"]
    assert (before["seeds"], before["segm_AP50"]) == (2, 45.0) and (after["seeds"], after["segm_AP50"]) == (1, 90.0)
    assert "+fusion_training=residual_cross_attention_end_to_end" in rows  # the other configuration is whole
    assert "different configs (training.modality_dropout)" in caplog.text


def test_results_of_older_code_are_read_as_percent_with_a_note(sweep_dir: Path, caplog):
    """A results.json without score_unit (older code) holds fractions: converted exactly, x100,
    with a note naming the file; an undefined value (-1, null) stays undefined."""
    old_file = sweep_dir / "staged2" / "results.json"
    results = json.loads(old_file.read_text())
    del results["score_unit"]
    results["test"] = {k: v / 100 if isinstance(v, float) and v >= 0 else v for k, v in results["test"].items()}
    old_file.write_text(json.dumps(results))
    assert results["test"]["segm_AP50"] == pytest.approx(0.50)
    with caplog.at_level("WARNING", logger="rts_thaw.reporting.collect"):
        report = write_report(sweep_dir)
    assert f"{old_file} has no score_unit" in caplog.text
    staged = {row["fusion"]: row for row in report["rows"]}["concat_conv"]
    assert staged["segm_AP50"] == pytest.approx(45.0)  # seeds 40 (new file) and 50 (old file): one unit
    assert staged["bbox_AP50"] == pytest.approx(46.0)
    assert math.isnan(staged["segm_APl"]) and math.isnan(staged["bbox_APl"])
    old_run = next(r for r in report["runs"] if r.run_dir == old_file.parent)
    assert old_run.results["score_unit"] == "percent" and old_run.results["test"]["bbox_APl"] == -1.0


def test_results_in_an_unknown_unit_are_refused(sweep_dir: Path):
    results_file = sweep_dir / "staged2" / "results.json"
    results = json.loads(results_file.read_text())
    results["score_unit"] = "permille"
    results_file.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"staged2/results.json: scores in unit 'permille'"):
        write_report(sweep_dir)


def test_report_lists_jobs_that_never_started(sweep_dir: Path):
    # The sweep launched 4 jobs; remove one job's directory as if SLURM never ran it.
    for path in sorted((sweep_dir / "staged2").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (sweep_dir / "staged2").rmdir()
    report = write_report(sweep_dir)
    not_started = [r for r in report["runs"] if r.status == "not started"]
    assert [sorted(r.overrides) for r in not_started] == [sorted(
        ["+fusion_training=concat_conv_staged", "data.modalities=[rgb,ndvi]", "+sweep=table2_fusion", "seed=2"])]
    assert "**not started**" in report["markdown"]


def test_report_cli_and_bad_input(sweep_dir: Path, tmp_path: Path):
    out = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, "-m", "rts_thaw.report", str(sweep_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| cascade_mvit | concat_conv |" in done.stdout and (out / "report.md").is_file()

    missing = subprocess.run([sys.executable, "-m", "rts_thaw.report", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope" in missing.stderr and "does not exist" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = subprocess.run([sys.executable, "-m", "rts_thaw.report", str(empty)],
                             capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "no runs found" in nothing.stderr
