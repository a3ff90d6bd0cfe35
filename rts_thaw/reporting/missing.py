"""Rows "fused model, <modality> missing at test" for a sweep report.

Each finished run of a fusion that runs without an auxiliary modality is scored again on
its test split (or the report's `--test-data`) with that modality withheld
(`rts_thaw.reporting.rescore`, computed once and kept in the run directory).
"""

from __future__ import annotations

import dataclasses

from rts_thaw.reporting.collect import Run
from rts_thaw.reporting.rescore import rescored_metrics

# The fusions whose detector leaves a missing modality's term out (`skips_missing`), and those
# whose encoder reads the modalities stacked: these run without one only if trained with
# modality dropout (`MultiModalDetector.optional_modalities`).
SKIPPING_FUSIONS = ("residual_cross_attention", "gated_local_attention")
STACKED_FUSIONS = ("data_level", "stacked_gated_local_attention")
KEY = "missing_at_test"


def missing_modality_runs(runs: list[Run], modalities: list[str], test_data: tuple[str, ...] = ()) -> list[Run]:
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
            results = {**run.results, "test": rescored_metrics(run, modality, test_data),
                       "modalities": [m for m in used if m != modality]}
            extra.append(dataclasses.replace(run, overrides=run.overrides + (f"{KEY}={modality}",),
                                             results=results))
    return extra


def _runs_without_a_modality(run: Run) -> bool:
    from rts_thaw.models.detector import trained_with_modality_dropout  # torch: only when rows are asked for

    fusion = run.choices.get("model/fusion")
    return fusion in SKIPPING_FUSIONS or (fusion in STACKED_FUSIONS and run.config is not None
                                          and trained_with_modality_dropout(run.config))
