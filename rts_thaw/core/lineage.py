"""Slump lineage tables, as tracking and the evolving synthetic world's truth share them:
relation names, the columns of lineage.csv and growth.csv in their order, reading and writing
them as CSV, and the dates they carry (ISO strings; years between two of them).

An empty id is a missing one (an empty CSV cell).
"""

from __future__ import annotations

import csv
import datetime
import math
import os
from pathlib import Path

RELATIONS = ("continued", "stabilised", "merged", "split", "new", "disappeared")
# Truth and tracker share these; the tracker adds its overlap measures after them.
LINEAGE_COLUMNS = ("site", "from_date", "to_date", "from_id", "to_id", "relation")
LINEAGE_TRACKER_COLUMNS = LINEAGE_COLUMNS + ("iou", "overlap_from", "overlap_to")
GROWTH_COLUMNS = ("site", "slump_id", "from_date", "to_date", "area_from_m2", "area_to_m2", "area_change_m2",
                  "area_change_m2_per_yr", "retreat_m_per_yr")
GROWTH_TRACKER_COLUMNS = GROWTH_COLUMNS + ("within_uncertainty",)
SUMMARY_COLUMNS = ("site", "year", "date", "count", "total_area_m2", "new", "continued", "stabilised", "merged",
                   "split", "disappeared")
DAYS_PER_YEAR = 365.25


def iso_date(value) -> str | None:
    """A date given as a date or as text, as YYYY-MM-DD; None when it is not one."""
    if isinstance(value, datetime.datetime):
        return value.date().isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    try:
        return datetime.date.fromisoformat(str(value)).isoformat()
    except ValueError:
        return None


def years_between(from_date: str, to_date: str) -> float:
    """Years (days / 365.25) from one ISO date to another."""
    return (datetime.date.fromisoformat(to_date) - datetime.date.fromisoformat(from_date)).days / DAYS_PER_YEAR


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(path: str | Path, columns: tuple[str, ...], rows: list[dict]) -> Path:
    """Rows as CSV with exactly `columns`, in order; written beside the target, then renamed in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[_cell(row[c]) for c in columns] for row in rows])
    os.replace(tmp, path)
    return path


def read_csv(path: str | Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """A table's rows as dicts of strings; an error naming the file when a column is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {', '.join(missing)} (found: {', '.join(reader.fieldnames or [])})")
        return list(reader)


def id_or_none(text: str, where: str) -> int | None:
    """A slump id cell: empty is None, else an integer (an error names where it is not one)."""
    if text is None or text.strip() == "":
        return None
    try:
        return int(float(text)) if float(text).is_integer() else int(text)
    except ValueError:
        raise ValueError(f"{where}: slump id {text!r} is not an integer") from None
