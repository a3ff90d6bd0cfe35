"""The file-scoring modes of `python -m rts_thaw.evaluate`.

    gt=<coco.json> predictions=<results.json> preset=coco|arctic_challenge   COCO metrics
    gt=<truth.gpkg> predictions=<mapped.gpkg> iou_threshold=0.5             polygon P/R/F1
    validate_submission=<submission.json> [data=arctic_challenge]           challenge checks
    tracks=<track output dir> truth=<world dir> iou_threshold=0.5           slump tracking links and growth
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from rts_thaw.core.json_files import write_json_atomic
from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY

# Ground truth in one of these is vector truth (polygon mode); .json is COCO.
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".shp")


def score_files_mode(cfg: DictConfig) -> dict:
    if not cfg.get("gt") or not cfg.get("predictions"):
        raise ValueError("scoring files needs both gt=<ground truth> and predictions=<predictions>")
    gt, predictions = Path(cfg.gt), Path(cfg.predictions)
    if gt.suffix.lower() in VECTOR_SUFFIXES:
        from rts_thaw.eval.polygons import evaluate_polygon_files

        report = evaluate_polygon_files(predictions, gt, cfg.get("iou_threshold", 0.5))
        rows = {"all": report, **report["by_size"]}
        for name, row in rows.items():
            print(f"{name:>8}: precision {_score(row['precision'])}  recall {_score(row['recall'])}  "
                  f"f1 {_score(row['f1'])}  "
                  f"(TP {row['true_positives']}, FP {row['false_positives']}, FN {row['false_negatives']})")
    else:
        from rts_thaw.eval.coco_files import evaluate_files

        report = evaluate_files(gt, predictions, cfg.preset or "coco")
        for name, value in report.items():
            print(f"{name:>12}: {_score(value)}")
    output = write_json_atomic(cfg.output, {"gt": str(gt), "predictions": str(predictions),
                                            SCORE_UNIT_KEY: SCORE_UNIT, "metrics": report})
    print(f"written to {output} (scores in percent)")
    return report


def _score(value: float) -> str:
    """A score (percent) as printed: two decimals, `-` where undefined."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def validate_submission_mode(cfg: DictConfig) -> list[str]:
    from rts_thaw.eval.submission import challenge_test_sizes, validate_submission

    sizes = None
    if cfg.get("data") is not None:  # ids and chip sizes from the release's test manifest
        sizes = challenge_test_sizes(cfg.data.path, cfg.split)
    problems = validate_submission(cfg.validate_submission, sizes)
    for problem in problems:
        print(problem)
    checked = "ids, sizes and structure" if sizes is not None else "structure only (pass data=... for ids and sizes)"
    print(f"{cfg.validate_submission}: {'valid' if not problems else f'{len(problems)} problem(s)'} ({checked})")
    if problems:
        raise SystemExit(1)
    return problems


def score_tracks_mode(cfg: DictConfig) -> dict:
    from rts_thaw.eval.tracking import evaluate_tracking

    if not cfg.get("tracks") or not cfg.get("truth"):
        raise ValueError("scoring tracks needs both tracks=<output dir of rts_thaw.track> and truth=<world dir with "
                         "scenes.yaml, lineage.csv, growth.csv>")
    report = evaluate_tracking(cfg.tracks, cfg.truth, cfg.get("iou_threshold", 0.5))

    def cell(value: float) -> str:
        return f"{_score(value):>9}"

    print(f"{'relation':>12} {'precision':>9} {'recall':>9} {'f1':>9}  correct/predicted  found/true  (scores in %)")
    for name, row in report["relations"].items():
        print(f"{name:>12} {cell(row['precision'])} {cell(row['recall'])} {cell(row['f1'])}  "
              f"{row['correct']:>7}/{row['predicted']:<9}  {row['found']:>5}/{row['true']}")
    growth = report["growth"]
    print(f"growth over {growth['matched_intervals']} of {growth['true_intervals']} true slump-intervals:")
    for measure in ("area_change_m2_per_yr", "retreat_m_per_yr"):
        print(f"  {measure}: median abs error {growth[measure]['median_abs_error']:.3g}, "
              f"median rel error {growth[measure]['median_rel_error']:.3g}, "
              f"within 5% of the truth {growth[measure]['within_5_percent']:.1f}% of them")
    output = write_json_atomic(cfg.output, {"tracks": str(cfg.tracks), "truth": str(cfg.truth),
                                            SCORE_UNIT_KEY: SCORE_UNIT, "metrics": report})
    print(f"written to {output}")
    return report
