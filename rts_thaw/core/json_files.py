"""Writing JSON files atomically and as strict JSON; the one helper every writer uses.

Atomic: the text goes to a uniquely named temporary file beside the target and is
renamed over it (`os.replace`), so a reader (or a run killed mid-write, or another
job writing the same file) only ever sees the old file or the complete new one,
never half a file. Strict: JSON has no NaN or infinity (Python's `json` would write
bare `NaN`, which other parsers reject), so every non-finite float is written as
`null`; readers turn it back into NaN where they compute with it.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def to_json_data(value: Any) -> Any:
    """`value` as plain JSON data: NaN/inf -> None; numpy and torch values, paths and
    mappings/lists/tuples converted recursively. Other objects are left as they are
    (`json.dumps` then refuses them)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):  # dict, and OmegaConf's DictConfig
        return {_key(k): to_json_data(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):  # list, tuple, ListConfig
        return [to_json_data(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_json_data(value.tolist())
    if hasattr(value, "item"):  # other scalar wrappers
        return to_json_data(value.item())
    return value


def _key(key: Any) -> Any:
    """Dict keys as `json.dumps` accepts them (numpy integers become ints, paths strings)."""
    if key is None or isinstance(key, (str, bool, int, float)):
        return key
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    if hasattr(key, "item"):
        return key.item()
    return key


def nan_for_null(value: Any) -> Any:
    """What a reader does with a written NaN: null (None) back to NaN, in a list or a dict's
    values (one level deep) or alone."""
    if isinstance(value, Mapping):
        return {k: math.nan if v is None else v for k, v in value.items()}
    if isinstance(value, list):
        return [math.nan if v is None else v for v in value]
    return math.nan if value is None else value


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2, *, sort_keys: bool = False) -> Path:
    """Write `data` to `path` as strict JSON, atomically; returns the path.

    `indent=None` writes compact JSON (one line). Raises, leaving any existing file
    untouched and no temporary file behind, if `data` cannot be serialised or written.
    """
    path = Path(path)
    text = json.dumps(to_json_data(data), indent=indent, sort_keys=sort_keys, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer, so concurrent writers of one file never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
