"""What makes two runs the same run: one list of the settings that do not change a result,
used for the run directory, the resume check (`callbacks.RunIdentityCheck`) and the stage-1
cache key. Free of Lightning: the entry point names run directories with it before logging
is set up.

A setting here may be changed between a run and its resumption (another GPU count, a
logger, a progress bar) without making it another run; every other setting makes it one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

# Config keys (a key stands for everything under it) that do not change what a run computes.
RUN_INVARIANT = (
    "hydra", "logger", "paths", "training.resume", "callbacks.prediction_images",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.enable_progress_bar", "trainer.default_root_dir", "trainer.log_every_n_steps",
    "data.num_workers", "data.persistent_workers", "data.pin_memory", "data.prefetch_factor",
    "training.speed",  # how fast, not what is learnt (up to float rounding): rts_thaw/models/speed.py
)


def is_run_invariant(key: str) -> bool:
    """Whether a dotted config key (or an override's key, `+`/`~` allowed) is in RUN_INVARIANT."""
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in RUN_INVARIANT)


def without_invariants(container: dict, prefix: str = "") -> dict:
    """A copy of a plain config dict without the RUN_INVARIANT keys."""
    return {k: without_invariants(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in container.items() if not is_run_invariant(f"{prefix}{k}")}


def resolved_without_invariants(node: DictConfig, prefix: str = "") -> dict:
    """A config node as plain containers, every value resolved except the RUN_INVARIANT ones,
    which are left out unread (some, such as the run directory, resolve only inside Hydra)."""
    plain = {}
    for key in node.keys():
        name = f"{prefix}{key}"
        if is_run_invariant(name):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            plain[key] = resolved_without_invariants(value, name + ".")
        else:
            plain[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    return plain


def config_key(cfg: DictConfig | dict, length: int = 12) -> str:
    """A short stable hash of a config (plain containers, sorted keys)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_key(cfg: DictConfig) -> str:
    """The hash of everything in a run's config that affects its result."""
    return config_key(without_invariants(OmegaConf.to_container(cfg, resolve=False)))


def run_directory_name(task_overrides: Iterable[str]) -> str:
    """The run's folder name from its command-line overrides (Hydra's `hydra.overrides.task`):
    the same command finds the same folder again, so a re-run or a SLURM requeue resumes."""
    kept = sorted(o for o in task_overrides if not is_run_invariant(o.split("=", 1)[0]))
    if not kept:
        return "base"
    return hashlib.sha256(",".join(kept).encode()).hexdigest()[:10]
