"""Scoring a tracking run against a world's truth (issue 18).

Truth: a folder with `scenes.yaml` (entries with date, site and a labels file whose polygons
carry an integer `slump_id`), `lineage.csv` and `growth.csv`. The tracker's run: a folder with
`slumps.gpkg` (layer `slumps`), `lineage.csv` and `growth.csv`.

Per (site, date), each tracker polygon is mapped to the true polygon it overlaps with IoU >=
`iou_threshold` (0.5: then at most one qualifies; the best is taken). A tracker link is correct
when its mapped endpoints and its relation equal a true link of the same site and interval (an
empty end must be empty in the truth too; an unmapped polygon matches nothing). Precision,
recall and F1, in percent (`rts_thaw.core.scores`), per relation and over all links. Growth:
for the tracker's growth rows whose slump maps to the same true slump at both dates and has a
true growth row, the median absolute error and median relative error (a fraction, not a score)
of area_change_m2_per_yr and retreat_m_per_yr, and the share of them within 5% of the truth (a
score: percent).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyogrio
import shapely

from rts_thaw.core.problems import listed
from rts_thaw.core.scores import percent
from rts_thaw.core.vectors import crs_problem, read_layer, reproject
from rts_thaw.data.geotiff import load_scene_list
from rts_thaw.core.lineage import GROWTH_COLUMNS, LINEAGE_COLUMNS, RELATIONS, id_or_none, read_csv

UNMATCHED = "unmatched"  # a tracker polygon with no true counterpart: equal to no true id, nor to an empty end
GROWTH_MEASURES = ("area_change_m2_per_yr", "retreat_m_per_yr")


def _true_polygons(truth_dir: Path, crs: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(site, date) -> (geometries in `crs`, slump ids) of the world's label files."""
    scenes = truth_dir / "scenes.yaml"
    problems, found = [], defaultdict(lambda: ([], []))
    for spec in load_scene_list(scenes):
        if spec.date is None or spec.labels is None:
            problems.append(f"{scenes}: scene {spec.id} needs a date and a labels file to score tracking")
            continue
        layer = read_layer(spec.labels)
        if "slump_id" not in layer.columns:
            problems.append(f"{spec.labels}: no slump_id column (the truth of tracking names each slump)")
            continue
        if (why := crs_problem(layer)) is not None:
            problems.append(f"{spec.labels}: {why}")
            continue
        geoms, ids = found[spec.site or "", spec.date]
        geoms += reproject(layer.geometries, layer.crs, crs)
        ids += [int(v) for v in layer.columns["slump_id"]]
    if problems:
        raise ValueError(listed(problems))
    return {key: (np.array(g, dtype=object), np.array(i, dtype=np.int64)) for key, (g, i) in found.items()}


def _tracker_polygons(tracks_dir: Path) -> tuple[str, dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    path = tracks_dir / "slumps.gpkg"
    if not path.exists():
        raise FileNotFoundError(f"tracker output not found: {path} (run python -m rts_thaw.track first)")
    if "slumps" not in pyogrio.list_layers(path)[:, 0]:
        raise ValueError(f"{path}: no layer 'slumps'")
    layer = read_layer(path, layer="slumps")
    missing = [c for c in ("slump_id", "site", "date") if c not in layer.columns]
    if missing:
        raise ValueError(f"{path}: layer 'slumps' has no column(s) {', '.join(missing)}")
    found = defaultdict(lambda: ([], []))
    for geometry, slump_id, site, date in zip(layer.geometries, layer.columns["slump_id"], layer.columns["site"],
                                              layer.columns["date"]):
        geoms, ids = found[str(site or ""), str(date)]
        geoms.append(geometry)
        ids.append(int(slump_id))
    return layer.crs, {key: (np.array(g, dtype=object), np.array(i, dtype=np.int64)) for key, (g, i) in found.items()}


def match_ids(predicted: np.ndarray, truth: np.ndarray, predicted_ids: np.ndarray, true_ids: np.ndarray,
              iou_threshold: float) -> dict[int, int]:
    """Tracker id -> true id of the polygons of one (site, date) overlapping with IoU >= threshold
    (each side used once, best IoU first)."""
    if len(predicted) == 0 or len(truth) == 0:
        return {}
    i, j = shapely.STRtree(truth).query(predicted, predicate="intersects")
    shared = shapely.area(shapely.intersection(predicted[i], truth[j]))
    iou = shared / (shapely.area(predicted[i]) + shapely.area(truth[j]) - shared)
    mapping, used = {}, set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < iou_threshold:
            break
        if predicted_ids[i[k]] in mapping or true_ids[j[k]] in used:
            continue
        mapping[int(predicted_ids[i[k]])] = int(true_ids[j[k]])
        used.add(int(true_ids[j[k]]))
    return mapping


def _links(path: Path) -> list[tuple]:
    rows = read_csv(path, LINEAGE_COLUMNS)
    links = []
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n}"
        if row["relation"] not in RELATIONS:
            raise ValueError(f"{where}: relation {row['relation']!r} is not one of {', '.join(RELATIONS)}")
        links.append((row["site"], row["from_date"], row["to_date"], id_or_none(row["from_id"], where),
                      id_or_none(row["to_id"], where), row["relation"]))
    return links


def _scores(correct: int, found: int, predicted: int, true: int) -> dict:
    """Scores (percent) of `correct` of `predicted` tracker links, which found `found` of `true` true links."""
    precision = percent(correct / predicted) if predicted else float("nan")
    recall = percent(found / true) if true else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else (
        0.0 if predicted and true else float("nan"))
    return {"precision": precision, "recall": recall, "f1": f1, "correct": correct, "predicted": predicted,
            "found": found, "true": true}


def _growth_errors(tracks_dir: Path, truth_dir: Path, ids: dict) -> dict:
    true_rows = {(r["site"], int(r["slump_id"]), r["from_date"], r["to_date"]): r
                 for r in read_csv(truth_dir / "growth.csv", GROWTH_COLUMNS)}
    errors = {m: ([], []) for m in GROWTH_MEASURES}
    pairs = 0
    for row in read_csv(tracks_dir / "growth.csv", GROWTH_COLUMNS):
        site, slump_id = row["site"], int(row["slump_id"])
        start = ids.get((site, row["from_date"]), {}).get(slump_id)
        end = ids.get((site, row["to_date"]), {}).get(slump_id)
        true = true_rows.get((site, start, row["from_date"], row["to_date"])) if start is not None else None
        if true is None or start != end:
            continue
        pairs += 1
        for measure in GROWTH_MEASURES:
            got, want = float(row[measure]), float(true[measure])
            errors[measure][0].append(abs(got - want))
            if want != 0:
                errors[measure][1].append(abs(got - want) / abs(want))
    report = {"matched_intervals": pairs, "true_intervals": len(true_rows)}
    for measure, (absolute, relative) in errors.items():
        report[measure] = {"median_abs_error": float(np.median(absolute)) if absolute else float("nan"),
                           "median_rel_error": float(np.median(relative)) if relative else float("nan"),
                           # a share of intervals, so a score: in percent
                           "within_5_percent": percent(np.mean(np.asarray(relative) <= 0.05)) if relative
                           else float("nan")}
    return report


def evaluate_tracking(tracks_dir: str | Path, truth_dir: str | Path, iou_threshold: float = 0.5) -> dict:
    """Link P/R/F1 per relation and over all links, and growth-rate errors; see the module docstring."""
    tracks_dir, truth_dir = Path(tracks_dir), Path(truth_dir)
    missing = [str(p) for p in (tracks_dir / "lineage.csv", tracks_dir / "growth.csv", truth_dir / "scenes.yaml",
                                truth_dir / "lineage.csv", truth_dir / "growth.csv") if not p.exists()]
    if missing:
        raise FileNotFoundError(f"tracking evaluation needs these files: {listed(missing)} not found")
    crs, predicted = _tracker_polygons(tracks_dir)
    truth = _true_polygons(truth_dir, crs)
    nothing = (np.array([], dtype=object), np.array([], dtype=np.int64))
    ids = {}
    for key, (geometries, slump_ids) in predicted.items():
        true_geometries, true_ids = truth.get(key, nothing)
        ids[key] = match_ids(geometries, true_geometries, slump_ids, true_ids, iou_threshold)

    def mapped(site, date, slump_id):
        if slump_id is None:
            return None
        return ids.get((site, date), {}).get(slump_id, UNMATCHED)

    true_links = set(_links(truth_dir / "lineage.csv"))
    tracker_links = _links(tracks_dir / "lineage.csv")
    right = defaultdict(int)  # correct tracker links (precision)
    found = defaultdict(set)  # true links some tracker link equals (recall)
    for site, d0, d1, a, b, relation in tracker_links:
        link = (site, d0, d1, mapped(site, d0, a), mapped(site, d1, b), relation)
        if link in true_links:
            right[relation] += 1
            found[relation].add(link)
    report = {"iou_threshold": iou_threshold, "relations": {}}
    for relation in RELATIONS:
        report["relations"][relation] = _scores(right[relation], len(found[relation]),
                                                sum(1 for link in tracker_links if link[5] == relation),
                                                sum(1 for link in true_links if link[5] == relation))
    report["relations"]["all"] = _scores(sum(right.values()), sum(len(f) for f in found.values()),
                                         len(tracker_links), len(true_links))
    matched = sum(len(m) for m in ids.values())
    report["polygons"] = {"tracker": sum(len(p[1]) for p in predicted.values()),
                          "true": sum(len(t[1]) for t in truth.values()), "matched": matched}
    report["growth"] = _growth_errors(tracks_dir, truth_dir, ids)
    return report
