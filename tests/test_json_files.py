"""rts_thaw.core.json_files: atomic, strict-JSON writing (real files in tmp_path)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rts_thaw.core import json_files
from rts_thaw.core.json_files import write_json_atomic


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (which Python's json accepts)."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_non_finite_floats_become_null_and_the_file_is_strict_json(tmp_path):
    data = {
        "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "finite": 0.25,
        "nested": {"list": [1.0, math.nan, {"deep": (math.inf, 2)}]},
        "numpy": {"scalar": np.float32("nan"), "array": np.array([1.5, np.nan, np.inf]), "int": np.int64(3)},
        "tensor": torch.tensor([0.5, float("nan")]),
    }
    path = write_json_atomic(tmp_path / "out" / "metrics.json", data)  # the folder is created
    assert path == tmp_path / "out" / "metrics.json"
    loaded = strict_loads(path.read_text())
    assert loaded == {
        "nan": None, "inf": None, "-inf": None, "finite": 0.25,
        "nested": {"list": [1.0, None, {"deep": [None, 2]}]},
        "numpy": {"scalar": None, "array": [1.5, None, None], "int": 3},
        "tensor": [0.5, None],
    }
    json.dumps(loaded, allow_nan=False)
    assert leftovers(path.parent, path.name) == []


def test_values_the_old_results_writer_handled(tmp_path):
    """Paths, numpy and torch scalars (what single_run's `_json_default` converted)."""
    data = {"checkpoint": Path("/runs/a/best.ckpt"), "step": np.int32(7), "ap": np.float64(0.5),
            "loss": torch.tensor(1.25), "flag": np.bool_(True), np.int64(4): "numpy key"}
    loaded = strict_loads(write_json_atomic(tmp_path / "results.json", data).read_text())
    assert loaded == {"checkpoint": "/runs/a/best.ckpt", "step": 7, "ap": 0.5, "loss": 1.25, "flag": True,
                      "4": "numpy key"}
    assert isinstance(loaded["step"], int) and loaded["flag"] is True


def test_round_trip_of_nested_data(tmp_path):
    data = {"name": "stage1 rgb", "ok": True, "none": None, "count": 12, "ratio": -0.125,
            "rows": [{"model": "a", "values": [1, 2.5, [3, {"x": "y"}]]}, {"model": "b", "values": []}],
            "unicode": "Tuktoyaktuk – thaw ° slump", "empty": {}}
    path = write_json_atomic(tmp_path / "data.json", data)
    assert strict_loads(path.read_text()) == data
    assert path.read_text().startswith("{\n  ")  # indent=2 by default


def test_indent_none_is_compact_and_sort_keys_sorts(tmp_path):
    path = write_json_atomic(tmp_path / "c.json", [{"b": 1, "a": math.nan}], indent=None)
    assert path.read_text() == '[{"b": 1, "a": null}]'
    path = write_json_atomic(tmp_path / "s.json", {"b": 1, "a": 2}, indent=None, sort_keys=True)
    assert path.read_text() == '{"a": 2, "b": 1}'


def test_replacing_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"version": 1})
    write_json_atomic(path, {"version": 2})
    assert strict_loads(path.read_text()) == {"version": 2}
    assert leftovers(tmp_path, path.name) == []


def test_unserialisable_data_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"version": 1})
    before = path.read_text()

    class Opaque:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(path, {"version": 2, "nested": [1, {"bad": Opaque()}]})
    assert path.read_text() == before
    assert leftovers(tmp_path, path.name) == []


def test_failure_after_the_temporary_file_is_written_cleans_it_up(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"version": 1})
    before = path.read_text()
    seen = []

    def failing_replace(src, dst):
        seen.append(Path(src))
        assert Path(src).parent == tmp_path and Path(src).read_text()  # complete, beside the target
        raise OSError("disk went away")

    monkeypatch.setattr(json_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_json_atomic(path, {"version": 2})
    assert seen and not seen[0].exists()
    assert path.read_text() == before
    assert leftovers(tmp_path, path.name) == []


def test_each_write_uses_its_own_temporary_file(tmp_path, monkeypatch):
    """Concurrent writers of one file (same process or not) never share a temporary name."""
    names = []
    real_replace = os.replace

    def recording_replace(src, dst):
        names.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(json_files.os, "replace", recording_replace)
    for i in range(3):
        write_json_atomic(tmp_path / "x.json", {"i": i})
    assert len(set(names)) == 3 and all(n.startswith(".x.json.") and n.endswith(".tmp") for n in names)
    assert strict_loads((tmp_path / "x.json").read_text()) == {"i": 2}
