"""Read a sweep directory: which jobs should exist, which finished, and their results.

A job's directory is Hydra's (it holds `.hydra/`); a finished job has the
`results.json` that `rts_thaw.train` writes last. Expected jobs come from the
sweep's own `multirun.yaml`, so a job that never started is listed too.

Scores are read in percent. A results file without `score_unit` was written by older code,
which wrote COCO fractions (0-1) and nothing else: they are converted exactly (x100), with a
logged note, rather than refused, since the only other way out is retraining the sweep.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY, percent
from rts_thaw.eval.coco import METRIC_KEYS
from rts_thaw.reporting.jobs import configuration_overrides, expand_jobs, override_key

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class Run:
    """One job of a sweep, finished or not."""

    overrides: tuple[str, ...]
    run_dir: Path | None = None
    status: str = "not started"  # finished | failed | unfinished | not started
    error: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's group -> option
    config: Any = None  # the job's composed config (OmegaConf), when its directory exists
    slurm_job_id: str | None = None

    @property
    def configuration(self) -> tuple[str, ...]:
        return configuration_overrides(self.overrides)

    @property
    def seed(self) -> str | None:
        for override in self.overrides:
            if override_key(override) == "seed":
                return override.split("=", 1)[1]
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read YAML ({error})") from error


def expected_jobs(sweep_dir: Path) -> list[tuple[str, ...]]:
    """The override lists of every job the sweep launched, from its `multirun.yaml`."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    hydra = (_read_yaml(path) or {}).get("hydra") or {}
    task_overrides = (hydra.get("overrides") or {}).get("task") or []
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return [tuple(job) for job in expand_jobs(task_overrides, params)]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories of the sweep that Hydra ran a job in (they hold `.hydra/overrides.yaml`)."""
    found = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        if run_dir != sweep_dir and ".submitit" not in run_dir.parts:
            found.append(run_dir)
    return found


def read_run(run_dir: Path, sweep_dir: Path) -> Run:
    overrides = tuple(_read_yaml(run_dir / ".hydra" / "overrides.yaml") or [])
    run = Run(overrides=overrides, run_dir=run_dir)
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        hydra = (_read_yaml(hydra_file) or {}).get("hydra") or {}
        run.choices = {k: str(v) for k, v in ((hydra.get("runtime") or {}).get("choices") or {}).items()
                       if not k.startswith("hydra/")}
        job_id = (hydra.get("job") or {}).get("id")
        run.slurm_job_id = str(job_id) if job_id and not str(job_id).startswith("job_id_for") else None
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        run.config = OmegaConf.load(config_file)

    results_file = run_dir / RESULTS_FILE
    if results_file.is_file():
        try:
            run.results = scores_in_percent(json.loads(results_file.read_text()), "test", results_file)
            run.status = "finished"
        except (OSError, json.JSONDecodeError) as error:
            run.status, run.error = "failed", f"{results_file}: unreadable ({error})"
    else:
        run.error = _job_error(sweep_dir, run.slurm_job_id)
        run.status = "failed" if run.error else "unfinished"
    return run


def scores_in_percent(data: dict[str, Any], metrics_key: str, path: Path) -> dict[str, Any]:
    """`data`, the content of a results or metrics file, with its COCO scores (under
    `metrics_key`) in percent: fractions of a file without `score_unit` (older code) are
    multiplied by 100, a negative value (undefined, as logged) is kept; another unit is refused."""
    unit = data.get(SCORE_UNIT_KEY)
    if unit == SCORE_UNIT:
        return data
    if unit is not None:
        raise ValueError(f"{path}: scores in unit {unit!r}, which this rts_thaw does not read (it writes "
                         f"{SCORE_UNIT!r}); rerun the job with this version")
    metrics = data.get(metrics_key)
    if not isinstance(metrics, dict):
        return {**data, SCORE_UNIT_KEY: SCORE_UNIT}  # no scores to convert
    log.warning("%s has no %s: written by an older rts_thaw, its scores are fractions; read as percent (x100)",
                path, SCORE_UNIT_KEY)
    converted = {k: percent(v) if k in METRIC_KEYS and is_number(v) and v >= 0 else v for k, v in metrics.items()}
    return {**data, metrics_key: converted, SCORE_UNIT_KEY: SCORE_UNIT}


def _job_error(sweep_dir: Path, job_id: str | None) -> str | None:
    """The last exception line of a job's submitit log, if the job died of one."""
    if not job_id:
        return None
    log_dir = sweep_dir / ".submitit" / job_id
    for log_file in sorted(log_dir.glob("*_log.err")):
        lines = log_file.read_text(errors="replace").splitlines()
        exceptions = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln)]
        if exceptions:
            return f"{exceptions[-1].strip()} (log: {log_file})"
    return None


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """Every job of the sweep: those with a directory, plus expected ones that never started."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    runs = [read_run(run_dir, sweep_dir) for run_dir in job_dirs(sweep_dir)]
    seen = {tuple(sorted(run.overrides)) for run in runs}
    expected = expected_jobs(sweep_dir)
    for job in expected:
        if tuple(sorted(job)) not in seen:
            runs.append(Run(overrides=job))
    # Launch order (the sweep's grid order) reads better than the folders' hash order.
    order = {tuple(sorted(job)): i for i, job in enumerate(expected)}
    runs.sort(key=lambda run: order.get(tuple(sorted(run.overrides)), len(order)))
    if not runs:
        raise ValueError(
            f"{sweep_dir}: no runs found (no */.hydra/overrides.yaml and no multirun.yaml); "
            "pass the directory of a `python -m rts_thaw.train -m` sweep"
        )
    return runs


def wandb_groups(runs: list[Run]) -> list[str]:
    """The W&B groups the runs were logged to (empty when none used W&B)."""
    groups = set()
    for run in runs:
        if run.config is None:
            continue
        group = _safe_select(run.config, "logger.wandb.group")
        if group is not None:
            project = _safe_select(run.config, "logger.wandb.project")
            groups.add(f"{project}/{group}" if project else str(group))
    return sorted(groups)


def _safe_select(config: Any, key: str) -> Any:
    try:
        return OmegaConf.select(config, key)
    except Exception:  # an interpolation that only resolves inside the Hydra app
        return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
