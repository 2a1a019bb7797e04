"""A stage timer: wall seconds of a block added to a timings dict under a stage name."""

from __future__ import annotations

import time
from types import TracebackType


class StageTimer:
    """Context manager adding the wall time of its block to ``timings[name]``.

    Parameters
    ----------
    timings : dict[str, float]
        Seconds per stage of one generation (accumulated: the same stage may run several
        times, e.g. the half-set solves and the half-map FSC both count as "half_sets").
    name : str
        Stage name (the key in ``metrics.json``'s ``timings``).

    Examples
    --------
    >>> t = {}
    >>> with StageTimer(t, "phasing"):
    ...     pass
    >>> "phasing" in t
    True
    """

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings = timings
        self.name = name
        self._start = 0.0

    def __enter__(self) -> StageTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.timings[self.name] = (self.timings.get(self.name, 0.0)
                                   + time.perf_counter() - self._start)
