"""The L-curve corner: choosing the Tikhonov regularisation weight of the merge.

The merge is solved for a fixed sweep of regularisation weights ``lambda``; for each the
residual norm ``||A x - b||`` and the solution norm ``||x||`` are recorded. In log-log
coordinates ``(log residual, log solution)`` these points trace an "L"; its corner (the
point of maximum curvature) balances data fit against regularisation (Hansen & O'Leary,
SIAM J. Sci. Comput. 14 (1993) 1487).

Curvature estimate used here: the signed **Menger curvature** of each interior triple of
consecutive points, the sweep sorted by increasing ``lambda``::

    kappa_i = 2 cross(P_i - P_{i-1}, P_{i+1} - P_i)
              / (|P_i - P_{i-1}| |P_{i+1} - P_i| |P_{i+1} - P_{i-1}|)

i.e. the inverse radius of the circle through the three points. It needs no
parametrisation, so it is exact for points on a circle whatever the (non-uniform) spacing of
``lambda``. The sign is positive for a left turn; with ``lambda`` increasing an L-curve runs
down its vertical branch (small residual, large solution) then right along its horizontal
branch, a left turn, so the corner is the maximum of the signed curvature. These functions
work on the host (the sweep has a handful of values).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from spinifel.backend.arrays import to_host


def _prepare(
    residual_norms: ArrayLike, solution_norms: ArrayLike, lambdas: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes; return (res, sol, lam, valid mask) as float64 1-D host arrays."""
    res = np.asarray(to_host(residual_norms), dtype=np.float64)
    sol = np.asarray(to_host(solution_norms), dtype=np.float64)
    lam = np.asarray(to_host(lambdas), dtype=np.float64)
    for name, arr in (("residual_norms", res), ("solution_norms", sol), ("lambdas", lam)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not res.shape == sol.shape == lam.shape:
        raise ValueError(
            "residual_norms, solution_norms and lambdas must have one length, got "
            f"{res.shape[0]}, {sol.shape[0]}, {lam.shape[0]}"
        )
    if res.shape[0] == 0:
        raise ValueError("the L-curve needs at least one lambda, got none")
    # Logarithms need strictly positive finite values; other points are ignored.
    with np.errstate(invalid="ignore"):
        valid = (
            np.isfinite(res) & np.isfinite(sol) & np.isfinite(lam)
            & (res > 0) & (sol > 0) & (lam > 0)
        )
    return res, sol, lam, valid


def _menger(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed Menger curvature of consecutive triples; NaN where two points coincide."""
    ax, ay = x[1:-1] - x[:-2], y[1:-1] - y[:-2]
    bx, by = x[2:] - x[1:-1], y[2:] - y[1:-1]
    cx, cy = x[2:] - x[:-2], y[2:] - y[:-2]
    denom = np.hypot(ax, ay) * np.hypot(bx, by) * np.hypot(cx, cy)
    cross = ax * by - ay * bx
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(denom > 0, 2.0 * cross / np.where(denom > 0, denom, 1.0), np.nan)
    return kappa


def lcurve_curvature(
    residual_norms: ArrayLike, solution_norms: ArrayLike, lambdas: ArrayLike
) -> np.ndarray:
    """Signed curvature of the L-curve at each sweep point.

    Parameters
    ----------
    residual_norms, solution_norms, lambdas : array_like, shape (n,)
        Residual norm ``||A x_lambda - b||``, solution norm ``||x_lambda||`` and
        regularisation weight for each point of the sweep, in any order (the curve is
        sorted by ``lambda`` internally).

    Returns
    -------
    numpy.ndarray, shape (n,), float64
        Curvature of the curve ``(log residual, log solution)`` at each point, in the
        order of the input (inverse log-units). NaN for the two end points of the sorted
        sweep (no curvature without two neighbours), for invalid points (zero, negative
        or non-finite value; they are dropped before taking neighbours) and where a point
        coincides with a neighbour (repeated ``lambda`` or identical norms).

    Raises
    ------
    ValueError
        If the inputs are not 1-D arrays of one common, non-zero length.
    """
    res, sol, lam, valid = _prepare(residual_norms, solution_norms, lambdas)
    kappa = np.full(res.shape, np.nan)
    idx = np.flatnonzero(valid)
    if idx.size < 3:
        return kappa
    idx = idx[np.argsort(lam[idx], kind="stable")]
    kappa[idx[1:-1]] = _menger(np.log(res[idx]), np.log(sol[idx]))
    return kappa


def lcurve_corner(
    residual_norms: ArrayLike, solution_norms: ArrayLike, lambdas: ArrayLike
) -> int:
    """Index of the L-curve corner (maximum curvature) in the input order.

    Parameters
    ----------
    residual_norms, solution_norms, lambdas : array_like, shape (n,)
        As for :func:`lcurve_curvature`, in any order.

    Returns
    -------
    int
        Index into the inputs of the chosen ``lambda``.

    Notes
    -----
    The corner is the interior point (of the valid points sorted by ``lambda``) with the
    largest positive signed curvature; a curvature counts as positive above
    ``sqrt(eps) / D``, ``D`` the diameter of the curve in log coordinates (so round-off on
    a straight line is no corner). Fallbacks, in order, never raising for a valid
    array:

    * no point with positive curvature (fewer than 3 valid points, a straight or
      flat curve, a curve bending the wrong way): the valid point closest to the origin
      after scaling log residual and log solution norm each to ``[0, 1]`` over the valid
      points (the "best compromise" point; for a straight line the middle one); ties go to
      the smaller ``lambda``; an axis with no spread counts as 0;
    * no valid point at all (every value zero, negative or NaN): the middle of the sweep
      sorted by ``lambda`` (NaN last), i.e. a moderate regularisation.
    """
    res, sol, lam, valid = _prepare(residual_norms, solution_norms, lambdas)
    kappa = lcurve_curvature(res, sol, lam)
    idx = np.flatnonzero(valid)
    if idx.size >= 3:
        lx, ly = np.log(res[idx]), np.log(sol[idx])
        diameter = np.hypot(np.ptp(lx), np.ptp(ly))
    else:
        diameter = 0.0
    # Curvature below sqrt(eps) / diameter is round-off on a straight line, not a corner.
    significant = np.sqrt(np.finfo(np.float64).eps) / diameter if diameter > 0 else np.inf
    with np.errstate(invalid="ignore"):
        positive = np.isfinite(kappa) & (kappa > significant)
    if positive.any():
        # Ties (equal curvature) go to the smaller lambda.
        cand = np.flatnonzero(positive)
        cand = cand[np.lexsort((lam[cand], -kappa[cand]))]
        return int(cand[0])
    if idx.size == 0:
        order = np.argsort(lam, kind="stable")  # NaN sorts last
        return int(order[(order.size - 1) // 2])
    lx, ly = np.log(res[idx]), np.log(sol[idx])

    def unit(v: np.ndarray) -> np.ndarray:
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    dist = np.hypot(unit(lx), unit(ly))
    best = idx[np.lexsort((lam[idx], dist))]
    return int(best[0])
