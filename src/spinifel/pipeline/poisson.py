"""Bookkeeping of the Poisson score in the solver: posteriors by rows, background per pixel.

The solver (:mod:`spinifel.pipeline.solver`) scores this rank's images against the model
slices with :func:`spinifel.orientation.likelihood.score_orientations`; the posterior it
keeps is on the host (``O(n k)`` values), so that the half sets can take their rows of it
and the merge (:mod:`spinifel.merging.probabilistic`) reads it without copies. No MPI here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from spinifel.backend.arrays import to_module
from spinifel.orientation.likelihood import Posterior

# Posterior fields with one row per image (the rest are scalars or per-pixel).
_ROW_FIELDS = ("indices", "weights", "n_kept", "log_likelihood", "entropy", "dropped_mass",
               "expected_slice_sum", "fluence")


def posterior_to_host(post: Posterior) -> Posterior:
    """The same posterior with every array on the host (numpy)."""
    arrays = {f: np.asarray(to_module(getattr(post, f), np)) for f in _ROW_FIELDS}
    mean_slice = None if post.mean_slice is None else np.asarray(to_module(post.mean_slice, np))
    return dataclasses.replace(post, mean_slice=mean_slice, **arrays)


def posterior_rows(post: Posterior, rows: np.ndarray) -> Posterior:
    """The posterior of the images selected by ``rows`` (host bool mask or indices, (n,))."""
    return dataclasses.replace(post, **{f: getattr(post, f)[rows] for f in _ROW_FIELDS})


def combine_posteriors(parts: list[Posterior], rows: list[np.ndarray], n: int) -> Posterior:
    """One posterior of ``n`` images from disjoint parts (host), part ``i`` at ``rows[i]``.

    Used by the independent half sets: each half is scored against its own half map. The
    per-image arrays are placed at their rows; ``n_orientations``, ``beta`` are the first
    part's (the same grid and schedule); ``mean_slice_sum`` and ``mean_slice`` are the means
    over the parts (each half map's orientation average).
    """
    first = parts[0]
    width = max(p.indices.shape[1] for p in parts)
    out = {}
    for f in _ROW_FIELDS:
        a = getattr(first, f)
        shape = (n, width) if a.ndim == 2 else (n,)
        fill = -1 if f == "indices" else 0
        out[f] = np.full(shape, fill, dtype=a.dtype)
        for part, r in zip(parts, rows):
            v = getattr(part, f)
            if v.ndim == 2:
                out[f][r, :v.shape[1]] = v
            else:
                out[f][r] = v
    slices = [p.mean_slice for p in parts if p.mean_slice is not None]
    return dataclasses.replace(first, mean_slice=np.mean(slices, axis=0) if slices else None,
                               mean_slice_sum=float(np.mean([p.mean_slice_sum for p in parts])),
                               **out)


def extend_background(b_sel: np.ndarray, shells_sel: np.ndarray,
                      shells_all: np.ndarray) -> np.ndarray:
    """A background estimated on a subset of the good pixels, on all of them.

    The estimate of :func:`spinifel.orientation.background.estimate_background` is constant
    on each ``|s|`` shell (flat: on all). Generations that match on the inner pixels only
    (resolution marching) estimate it there; each shell takes its mean over the selected
    pixels, and a shell without any takes the value of the nearest shell with some.

    Parameters
    ----------
    b_sel : ndarray (P_sel,) float64
        Background at the selected pixels (photons).
    shells_sel, shells_all : ndarray (P_sel,), (P,) int
        Shell of the selected pixels and of all the good pixels.

    Returns
    -------
    ndarray (P,) float64
    """
    n = int(max(shells_all.max(), shells_sel.max())) + 1
    count = np.bincount(shells_sel, minlength=n)
    have = np.flatnonzero(count)
    value = np.bincount(shells_sel, b_sel, minlength=n)[have] / count[have]
    per_shell = np.interp(np.arange(n), have, value)
    return per_shell[shells_all]


def posterior_log_text(metrics: dict[str, Any]) -> str:
    """The log line's posterior part: log-likelihood, information rate, beta, kept per image."""
    text = (f"log-likelihood {metrics['log_likelihood']:.5g}, information "
            f"{metrics['mutual_information']:.2f} nats, beta {metrics['beta']:.3g}, kept "
            f"{metrics['orientations_kept_mean']:.1f}/image")
    if "background_photons_per_pixel" in metrics:
        text += f", background {metrics['background_photons_per_pixel']:.3g} photons/pixel"
    return text


def one_hot_posterior(post: Posterior) -> Posterior:
    """A posterior that puts image ``i`` at row ``i`` of its own orientation list with
    probability 1 (host arrays): the merge's input after likelihood refinement, whose
    orientations (one per image) replace the grid (``Assignment.posterior_grid``).
    Fluence and the per-image statistics are ``post``'s."""
    n = post.indices.shape[0]
    return dataclasses.replace(post, indices=np.arange(n, dtype=np.int64)[:, None],
                               weights=np.ones((n, 1)), n_kept=np.ones(n, dtype=np.int64))
