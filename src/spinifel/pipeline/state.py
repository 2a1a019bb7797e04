"""What one generation hands to the next, and what a checkpoint stores of it.

A :class:`ChainState` is one map's chain (the full map, or one half map under
``validation.half_sets``): merged and phased autocorrelation, density and support, the
warm start of the next merge and phasing. A :class:`SolverState` adds the generation and
this rank's orientations and grid-match indices. Every array of a chain is identical on
every rank (broadcast after phasing); orientations and indices are this rank's rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ChainState:
    """One chain's maps after a generation (identical on every rank; host arrays).

    Attributes
    ----------
    generation : int
        Last generation merged into this chain (-1: none yet).
    merged_ac : ndarray (M, M, M) float64 or None
        Merged autocorrelation (warm start of the next CG solve).
    phased_ac : ndarray (M, M, M) float64 or None
        Autocorrelation of the phased density, on the data's scale (the model sliced for
        matching and the merge's Tikhonov prior).
    density : ndarray (M, M, M) float64 or None
        Phased density (warm start of the next phasing).
    support : ndarray (M, M, M) bool or None
        Its real-space support.
    """

    generation: int = -1
    merged_ac: np.ndarray | None = None
    phased_ac: np.ndarray | None = None
    density: np.ndarray | None = None
    support: np.ndarray | None = None


@dataclass
class SolverState:
    """The solver's state between generations.

    Attributes
    ----------
    generation : int
        Last completed generation (-1 before the first).
    orientations : ndarray (n_local, 4) float64
        This rank's orientations (``[w, x, y, z]``) used by the last merge (before the first
        generation: the initial ones).
    match_index : ndarray (n_local,) int64 or None
        This rank's grid indices of the last matching (None before any matching).
    full : ChainState
        The full map's chain.
    halves : list of two ChainState, or None
        The half maps' chains (``validation.half_sets``); each warm-starts only from itself.
    converged : bool
        The last generation met both convergence tolerances.
    fluence : ndarray (n_local,) float64 or None
        ``algorithm.score = "poisson"`` with ``algorithm.fluence = "emc"``: this rank's
        fluences of the last scoring (the next scoring's ``phi``); None otherwise.
    background : tuple (ndarray (P,) float64, float) or None
        Poisson score with ``algorithm.background``: the last estimate of the background
        per good pixel (photons) and the mean fluence it was fitted with (identical on
        every rank); the next scoring adds ``background / fluence`` to the slices.
        Neither is checkpointed: a resumed run re-estimates them.
    """

    generation: int
    orientations: np.ndarray
    match_index: np.ndarray | None
    full: ChainState
    halves: list[ChainState] | None = None
    converged: bool = False
    fluence: np.ndarray | None = None
    background: tuple[np.ndarray, float] | None = None

    @classmethod
    def initial(cls, problem: Any) -> SolverState:
        """Before generation 0: the problem's initial orientations and empty chains."""
        halves = None if problem.halves is None else [ChainState(), ChainState()]
        return cls(generation=-1, orientations=problem.initial_orientations(), match_index=None,
                   full=ChainState(), halves=halves)

    @classmethod
    def from_checkpoint(cls, ck: dict, start: int, stop: int, with_halves: bool
                        ) -> SolverState:
        """The state saved in a checkpoint (:func:`spinifel.io.checkpoint.read_checkpoint`).

        ``start``/``stop`` are this rank's rows (the checkpoint holds every image's
        orientations and indices, in file order). Half chains are restored when
        ``with_halves`` and the checkpoint has them, else they start empty.
        """
        g = ck["generation"]
        full = ChainState(generation=g, merged_ac=ck["merged_ac"], phased_ac=ck["phased_ac"],
                          density=ck["density"], support=ck["support"].astype(bool))
        halves = None
        if with_halves:
            halves = [ChainState(), ChainState()]
            if ck.get("half_density") is not None:
                halves = [ChainState(generation=g, merged_ac=ck["half_merged_ac"][h],
                                     phased_ac=ck["half_phased_ac"][h],
                                     density=ck["half_density"][h],
                                     support=ck["half_support"][h].astype(bool)) for h in (0, 1)]
        index = None if ck["match_index"] is None else ck["match_index"][start:stop]
        return cls(generation=g, orientations=ck["orientations"][start:stop], match_index=index,
                   full=full, halves=halves)

    def checkpoint_arrays(self, orientations: np.ndarray, match_index: np.ndarray | None
                          ) -> dict:
        """The arrays a checkpoint stores (rank 0), given every image's ``orientations``
        ``(N, 4)`` and ``match_index`` ``(N,)`` (or None) in file order."""
        f = self.full
        arrays = dict(merged_ac=f.merged_ac, phased_ac=f.phased_ac, density=f.density,
                      support=f.support.astype(np.uint8), orientations=orientations,
                      match_index=match_index)
        h = self.halves
        if h is not None and h[0].density is not None:
            arrays.update(half_merged_ac=np.stack([c.merged_ac for c in h]),
                          half_phased_ac=np.stack([c.phased_ac for c in h]),
                          half_density=np.stack([c.density for c in h]),
                          half_support=np.stack([c.support for c in h]).astype(np.uint8))
        return arrays


def remove_stale_temporaries(out_dir: str | Path) -> None:
    """Delete temporaries of a run killed mid-write (never under a final name; rank 0)."""
    for stale in Path(out_dir).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
