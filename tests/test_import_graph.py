"""The layers of rts_thaw, bottom up: core -> data -> models / tracking -> eval -> mapping -> training ->
reporting -> the entry points (train, predict, evaluate, report). A package imports only the
ones below it, so a backward import (say eval reaching into mapping) fails here. Training sits
above mapping: its evaluation scores chips larger than the tile through the prediction engine."""

import ast
import subprocess
import sys
from pathlib import Path

import rts_thaw

PACKAGE = Path(rts_thaw.__file__).parent
BELOW = {
    "core": set(),
    "data": {"core"},
    "models": {"core", "data"},
    "tracking": {"core", "data"},
    "eval": {"core", "data", "models", "tracking"},
    "mapping": {"core", "data", "models", "tracking", "eval"},
    "training": {"core", "data", "models", "tracking", "eval", "mapping"},
    "reporting": {"core", "data", "models", "tracking", "eval", "mapping", "training"},
}


def rts_thaw_imports(path: Path) -> set[str]:
    """The rts_thaw modules a file imports anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rts_thaw"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rts_thaw"):
            found.add(node.module)
            if node.module == "rts_thaw":  # from rts_thaw import data
                found.update(f"rts_thaw.{a.name}" for a in node.names)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in BELOW else None


def test_no_package_imports_one_above_it():
    backward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of("rts_thaw." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own is None:  # an entry point: it may use every layer
            continue
        for module in rts_thaw_imports(path):
            target = layer_of(module)
            if target != own and target not in BELOW[own]:
                backward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not backward, "imports against the layers:\n" + "\n".join(backward)


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} - {"conf", "sweeps"}
    assert packages == set(BELOW)


def test_the_scan_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from rts_thaw.mapping.instances import SceneInstance\n")
    assert rts_thaw_imports(source) == {"rts_thaw.mapping.instances"}


def test_loading_a_model_for_prediction_does_not_import_lightning():
    code = ("import sys, rts_thaw.mapping.map_scenes, rts_thaw.mapping.challenge, rts_thaw.models.checkpoint; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
