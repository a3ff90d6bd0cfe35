"""The jobs of a Hydra sweep: the override lists its basic sweeper launches.

Shared by the report (which jobs should exist in a sweep directory) and the tests
(every job of every sweep config composes), so that both expand a sweep exactly
the way `python -m rts_thaw.train -m` does.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

# Overrides that name a repetition of a configuration, not the configuration itself.
REPEAT_KEYS = ("seed",)


def sweeper_params_as_overrides(params: Mapping | None) -> list[str]:
    """`hydra.sweeper.params` ({key: "a,b,c"}) as command-line overrides ("key=a,b,c")."""
    return [f"{key}={value}" for key, value in (params or {}).items()]


def expand_jobs(overrides: Iterable[str], sweeper_params: Mapping | None = None) -> list[list[str]]:
    """Every job's override list, in launch order, as Hydra's basic sweeper makes them.

    The sweeper puts the config's `hydra.sweeper.params` first and the command
    line after it (so the command line wins on a repeated key).
    """
    arguments = sweeper_params_as_overrides(sweeper_params) + list(overrides)
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        # A repeated key keeps its first place and takes its last values, as in the sweeper.
        choices[override.get_key_element()] = override_choices(override)
    return [list(job) for job in itertools.product(*choices.values())]


def override_choices(override: Override) -> list[str]:
    """The "key=value" strings one parsed override stands for: one, or one per swept value."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if not override.is_discrete_sweep():  # range() is discrete; interval() needs a search sweeper
        raise HydraException(f"BasicSweeper does not support sweep type : {override.value_type.name}")
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def override_key(override: str) -> str:
    """The key of an override string: "+experiment=x" -> "experiment", "a.b=1" -> "a.b"."""
    return override.split("=", 1)[0].lstrip("+~")


def configuration_overrides(job_overrides: Iterable[str]) -> tuple[str, ...]:
    """A job's overrides without its repetition keys (seed): the configuration it runs."""
    return tuple(o for o in job_overrides if override_key(o) not in REPEAT_KEYS)
