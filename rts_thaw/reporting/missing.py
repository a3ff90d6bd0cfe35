"""Rows "fused model, <modality> missing at test" for a sweep report.

Each finished run of a fusion that runs without an auxiliary modality is evaluated again
on its test split with that modality withheld (`rts_thaw.evaluate ... missing_modalities`),
once: the metrics are kept in the run directory (`missing_<modality>.json`) and reused
while they are newer than the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rts_thaw.core.json_files import nan_for_null, write_json_atomic
from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY
from rts_thaw.reporting.collect import Run, scores_in_percent

# The fusions whose detector leaves a missing modality's term out (`skips_missing`), and those
# whose encoder reads the modalities stacked: these run without one only if trained with
# modality dropout (`MultiModalDetector.optional_modalities`).
SKIPPING_FUSIONS = ("residual_cross_attention", "gated_local_attention")
STACKED_FUSIONS = ("data_level", "stacked_gated_local_attention")
KEY = "missing_at_test"


def _metrics_without(run: Run, modality: str) -> dict[str, float]:
    checkpoint = Path(run.results.get("best_checkpoint") or run.results.get("last_checkpoint") or "")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run.run_dir}: its checkpoint {checkpoint} is gone; cannot evaluate it "
                                f"without {modality}")
    cached = Path(run.run_dir) / f"missing_{modality}.json"
    if cached.is_file() and cached.stat().st_mtime >= checkpoint.stat().st_mtime:
        return nan_for_null(scores_in_percent(json.loads(cached.read_text()), "metrics", cached)["metrics"])
    from rts_thaw.training.evaluation import evaluate_checkpoint  # Lightning: only when needed

    metrics = evaluate_checkpoint(checkpoint, missing_modalities=[modality],
                                  trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    write_json_atomic(cached, {"checkpoint": str(checkpoint), "missing_modalities": [modality],
                               SCORE_UNIT_KEY: SCORE_UNIT, "metrics": metrics}, sort_keys=True)
    return metrics


def missing_modality_runs(runs: list[Run], modalities: list[str]) -> list[Run]:
    """For every finished run of a skipping fusion that has `modality`, the same run scored
    without it: its overrides gain `missing_at_test=<modality>`, its modalities lose it."""
    extra = []
    for run in runs:
        if run.status != "finished" or not _runs_without_a_modality(run):
            continue
        for modality in modalities:
            used = list(run.results.get("modalities") or [])
            if modality not in used:
                continue
            results = {**run.results, "test": _metrics_without(run, modality),
                       "modalities": [m for m in used if m != modality]}
            extra.append(dataclasses.replace(run, overrides=run.overrides + (f"{KEY}={modality}",),
                                             results=results))
    return extra


def _runs_without_a_modality(run: Run) -> bool:
    from rts_thaw.models.detector import trained_with_modality_dropout  # torch: only when rows are asked for

    fusion = run.choices.get("model/fusion")
    return fusion in SKIPPING_FUSIONS or (fusion in STACKED_FUSIONS and run.config is not None
                                          and trained_with_modality_dropout(run.config))
