"""The package list in pyproject.toml names every subpackage: an editable install finds them all
anyway, so a missing one shows only in a wheel (rts_thaw.core was missing from one, and a
non-editable install could import nothing)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "rts_thaw").rglob("__init__.py")}
    on_disk |= {name for name, folder in config["package-dir"].items() if (ROOT / folder / "__init__.py").exists()}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
