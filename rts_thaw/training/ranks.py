"""Which process of a multi-process (DDP) run this one is, known before any Trainer exists.

Every rank runs the same command: Lightning starts the others itself, or SLURM starts one
task per rank. They train together, so a rank other than 0 must never wait for a lock
that rank 0 holds while training (both would wait for ever), and only rank 0 writes a
run's files, once.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_only


def is_global_zero() -> bool:
    """True in the first process (and in a single-process run). Lightning reads the rank from
    the environment its launcher or SLURM sets (LOCAL_RANK, SLURM_PROCID, ...)."""
    return getattr(rank_zero_only, "rank", 0) == 0
