"""Rank-aware logging, configured once in ``main()`` (never at import).

Rank 0 logs at INFO (progress, per-stage timings); other ranks log WARNING and above so a
many-rank job prints one stream, yet a problem on any rank is still seen, tagged with
its rank.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "spinifel"


def setup_logging(rank: int = 0, size: int = 1, verbose: bool = False, quiet: bool = False) -> logging.Logger:
    """Configure the ``spinifel`` logger for this rank and return it."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [{rank}/{size}] %(levelname)s %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    if rank == 0 and not quiet:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
    logger.propagate = False
    return logger
