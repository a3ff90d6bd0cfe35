"""What made the maps in an output folder: the checkpoint, the settings that change a map,
the modalities and the code version, written beside the maps (`predict_identity.json`).

A rerun with the same identity skips the scenes already done; one with another identity
would mix maps of two models or thresholds in one folder, so it is refused, naming the
settings that differ, unless the user asks to overwrite.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from rts_thaw.core.json_files import write_json_atomic
from rts_thaw.mapping.engine import TilingConfig

IDENTITY_FILE = "predict_identity.json"
# Tiling settings that change no map: how fast it is made, not what it is.
SPEED_ONLY = ("batch_size", "num_workers", "write_workers")


def map_identity(checkpoint: str, modalities: Sequence[str], tiling: TilingConfig, precision: str,
                 outputs: Sequence[str]) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(tiling).items() if k not in SPEED_ONLY}
    return {"checkpoint": checkpoint, "modalities": list(modalities), "tiling": settings,
            "precision": str(precision), "outputs": sorted(outputs), "rts_thaw": version("rts_thaw")}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return found


def claim_output_dir(output_dir: Path, identity: dict, overwrite: bool) -> bool:
    """Record `identity` for the maps of `output_dir`; returns whether finished scenes may be
    skipped (False: every scene is mapped again). Refuses maps made with another identity."""
    path = output_dir / IDENTITY_FILE
    maps = [p for p in output_dir.glob("*.gpkg")] if output_dir.is_dir() else []
    if path.is_file() and not overwrite:
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupt ({error}); pass overwrite=true to map every scene again") from error
        differences = _differences(recorded, identity)
        if differences:
            raise ValueError(f"{output_dir} holds maps made with other settings; mixing them would give a layer "
                             f"of two kinds: {'; '.join(differences)}. Use another output_dir, or pass "
                             "overwrite=true to map every scene again")
    elif maps and not overwrite:
        raise ValueError(f"{output_dir} holds {len(maps)} map(s) with no record of what made them "
                         f"({IDENTITY_FILE}); use another output_dir, or pass overwrite=true")
    write_json_atomic(path, identity, sort_keys=True)
    return not overwrite
