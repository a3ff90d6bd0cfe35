"""Paper-style tables: one row per configuration, mean and spread over seeds."""

from __future__ import annotations

import json
import logging
import math
import statistics
from typing import Any

from omegaconf import OmegaConf

from rts_thaw.eval.coco import AP_KEYS
from rts_thaw.eval.results_table import RUN_FIGURES
from rts_thaw.reporting.collect import Run, is_number
from rts_thaw.reporting.jobs import REPEAT_KEYS, override_key
from rts_thaw.training.run_identity import without_invariants

log = logging.getLogger(__name__)

METRICS = AP_KEYS + list(RUN_FIGURES.values())
DESCRIPTION = ["model", "fusion", "modalities", "training"]


def describe(run: Run) -> dict[str, str]:
    """What a configuration is, in the paper's terms: model, fusion, modalities, training."""
    config = run.config
    modalities = run.results.get("modalities") or _select(config, "data.modalities")
    staged = _select(config, "training.staged")
    fusion = run.choices.get("model/fusion") or "?"
    return {
        "model": run.choices.get("model") or "?",
        "fusion": fusion,
        "modalities": "+".join(modalities) if modalities else "?",
        "training": "staged" if staged else ("end_to_end" if fusion not in ("none", "?") else "single"),
    }


def _select(config: Any, key: str) -> Any:
    if config is None:
        return None
    try:
        value = OmegaConf.select(config, key)
    except Exception:  # interpolation only resolvable inside the Hydra app
        return None
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def run_values(run: Run) -> dict[str, float]:
    """A finished run's metrics and figures as numbers (NaN where undefined or absent)."""
    test = run.results.get("test") or {}
    values = {}
    for key in AP_KEYS:
        value = test.get(key)
        # The trainer logs undefined AP (no object of that size) as -1.
        values[key] = float(value) if is_number(value) and value >= 0 else math.nan
    for key, column in RUN_FIGURES.items():
        value = run.results.get(key)
        values[column] = float(value) if is_number(value) else math.nan
    return values


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between the sweep's configurations (seed excluded)."""
    per_run = [{override_key(o): o.split("=", 1)[-1] for o in run.configuration} for run in runs]
    keys = list(dict.fromkeys(key for overrides in per_run for key in overrides))
    return [key for key in keys if len({overrides.get(key) for overrides in per_run}) > 1]


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def configuration_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per configuration (every seed of it averaged); unfinished runs count as missing.
    Runs of the same overrides whose composed configs differ (a config file was edited between
    them) are not averaged together: each version gets its own row, labelled with the settings
    that tell them apart."""
    keys = varying_keys(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(sorted(run.configuration)), []).append(run)
    rows = []
    for configuration, versions in ((c, _split_by_settings(m)) for c, m in groups.items()):
        for settings, members in versions:
            label = " ".join(o for o in configuration if override_key(o) in keys) or "(base)"
            rows.append(_row(label + (f" [{settings}]" if settings else ""), members))
    return rows


def _split_by_settings(members: list[Run]) -> list[tuple[str, list[Run]]]:
    """`members` (one configuration's runs) by what their composed configs set, seed aside:
    [("", members)] when they agree; runs without a config (never started) join the first."""
    flat = {id(r): _settings(r.config) for r in members if r.config is not None}
    versions: dict[str, list[Run]] = {}
    for run in members:
        if id(run) in flat:
            versions.setdefault(json.dumps(flat[id(run)], sort_keys=True, default=str), []).append(run)
    if len(versions) < 2:
        return [("", members)]
    differing = sorted(k for k in set().union(*flat.values()) if len({json.dumps(f.get(k), default=str)
                                                                       for f in flat.values()}) > 1)
    split = [(", ".join(f"{k}={flat[id(group[0])].get(k, '(unset)')}" for k in differing), group)
             for group in versions.values()]
    split[0][1].extend(r for r in members if r.config is None)
    log.warning("runs of the same overrides with different configs (%s), reported as separate rows: %s",
                ", ".join(differing), "; ".join(label for label, _ in split))
    return split


def _settings(config: Any) -> dict[str, Any]:
    """A run's composed config as flat dotted keys, without the seed and the settings that do
    not change a result (RUN_INVARIANT), unresolved (some resolve only inside Hydra)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(without_invariants(OmegaConf.to_container(config, resolve=False)), "")
    return {k: v for k, v in flat.items() if k not in REPEAT_KEYS}


def _row(label: str, members: list[Run]) -> dict[str, Any]:
    """One row of the table: the mean and spread of `members`' finished runs."""
    finished = [r for r in members if r.status == "finished"]
    reference = finished[0] if finished else next((r for r in members if r.config is not None), members[0])
    row: dict[str, Any] = {"configuration": label}
    row.update(describe(reference))
    row["seeds"] = len(finished)
    row["jobs"] = len(members)
    per_run = [run_values(r) for r in finished]
    for metric in METRICS:
        mean, std = _mean_std([v[metric] for v in per_run])
        row[metric] = mean
        row[f"{metric}_std"] = std
    return row


def _cell(row: dict, metric: str, scale: float, fmt: str) -> str:
    mean, std = row[metric], row[f"{metric}_std"]
    if math.isnan(mean):
        return "-"
    text = fmt.format(mean * scale)
    return text + (f" ± {fmt.format(std * scale)}" if row["seeds"] > 1 else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """AP in percent (as computed, and as the paper), parameters in millions, memory in MB, time in s."""
    # The overrides that tell rows apart, where model/fusion/modalities/training do not.
    descriptions = [tuple(row[k] for k in DESCRIPTION) for row in rows]
    show_overrides = len(set(descriptions)) < len(descriptions)
    header = (["configuration"] * show_overrides + DESCRIPTION + ["seeds"] + [f"mask {m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
              + [f"box {m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
              + ["trainable (M)", "total (M)", "peak mem (MB)", "train img/s", "wall (s)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['configuration']}`"] * show_overrides + [str(row[k]) for k in DESCRIPTION]
        cells += [f"{row['seeds']}/{row['jobs']}"]
        cells += [_cell(row, m, 1.0, "{:.2f}") for m in AP_KEYS]  # computed in percent
        cells += [_cell(row, "trainable_params", 1e-6, "{:.2f}"), _cell(row, "total_params", 1e-6, "{:.2f}"),
                  _cell(row, "peak_memory_mb", 1.0, "{:.0f}"), _cell(row, "train_images_per_s", 1.0, "{:.1f}"),
                  _cell(row, "wall_s", 1.0, "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Every job on its own row (status, seed, directory, metrics): the per-run CSV."""
    rows = []
    for run in runs:
        row = {"status": run.status, "seed": run.seed, "overrides": " ".join(run.overrides),
               "run_dir": str(run.run_dir) if run.run_dir else "", "error": run.error or ""}
        row.update(describe(run))
        row.update(run_values(run) if run.status == "finished" else {m: math.nan for m in METRICS})
        rows.append(row)
    return rows
