"""Lightning's log messages once, through Hydra's handlers (console and the run's log file).

Importing `lightning` gives its top-level logger a console handler of its own, while its
sub-loggers also propagate to the root logger that Hydra configured: every message
would print twice, and silencing the sub-loggers instead drops them from the log file.
"""

from __future__ import annotations

import logging


def log_lightning_through_hydra() -> None:
    import lightning  # noqa: F401  (importing it adds the handler removed below)

    logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:  # only when someone (Hydra) handles the root logger
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
