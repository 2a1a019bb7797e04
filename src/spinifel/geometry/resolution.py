"""Resolution marching for orientation matching, counted in measured pixels (issue 13, item 7).

Generation ``g >= 1`` matches on the pixels with ``|s|`` up to a cutoff that grows with ``g``.
The fraction :func:`matching_fraction` is today's: ``match_resolution_start`` at generation 1,
growing linearly to 1 at generation ``match_resolution_ramp``.

Before, the cutoff was ``fraction * max|s|`` whatever the mask: with a beamstop of radius 14
pixels on a 64 x 64 detector (issue 13's geometry, 4.6 keV), generation 1 matched on the thin
ring between 0.34 and 0.40 of ``max|s|``: 280 pixels, 8 % of the good ones, against 896 (22 %)
without the beamstop. Now it matches on 896 pixels (26 % of the good ones, out to 0.52 of
``max|s|``); with a beamstop of radius 3, on 896 instead of 864.

:func:`matching_cutoff` keeps the **number** of pixels instead: generation ``g`` matches on the
``n_g`` innermost good pixels, where ``n_g`` is the number of pixels of the whole detector
(good or not) with ``|s| <= fraction * max|s|``. On a detector with no masked pixel this is
exactly today's selection (the same set of pixels); a beamstop or a gap pushes the cutoff out
by the area it removes, so the first generations always see as many measured pixels as an
unmasked detector would, still the lowest resolutions available. At fraction 1 the cutoff is
``max|s|`` of the good pixels (every good pixel).
"""

from __future__ import annotations

import numpy as np


def matching_fraction(generation: int, start: float, ramp: int) -> float:
    """Today's fraction of the largest ``|s|`` for ``generation`` (>= 1).

    ``start`` at generation 1, linear to 1 at generation ``ramp``; 1 when ``ramp <= 1``.
    """
    if ramp <= 1:
        return 1.0
    t = (generation - 1) / (ramp - 1)
    return float(min(1.0, start + (1.0 - start) * t))


def matching_cutoff(generation: int, s_good: np.ndarray, s_all: np.ndarray, *, start: float,
                    ramp: int) -> float:
    """``|s|`` cutoff of generation ``generation``: select ``s_good <= cutoff``.

    Parameters
    ----------
    generation : int
        M-TIP generation, >= 1.
    s_good : ndarray, shape (n_good,)
        ``|s|`` of the good (measured) pixels, inverse metres; the same on every rank.
    s_all : ndarray, shape (n_pixels,)
        ``|s|`` of every pixel of the detector, masked or not (after clipping and binning).
    start, ramp : float, int
        ``algorithm.match_resolution_start`` and ``algorithm.match_resolution_ramp``.

    Returns
    -------
    float
        Inverse metres. The ``n``-th smallest ``s_good`` with ``n = #{s_all <= f max(s_all)}``
        (``f`` = :func:`matching_fraction`), at least 1 and at most ``len(s_good)``; pixels
        tied with the ``n``-th (symmetric pixels share ``|s|``) are selected too.

    Raises
    ------
    ValueError
        If ``s_good`` is empty.
    """
    good = np.sort(np.asarray(s_good, dtype=np.float64).ravel())
    if good.size == 0:
        raise ValueError("matching_cutoff: no good pixels")
    f = matching_fraction(generation, start, ramp)
    if f >= 1.0:
        return float(good[-1])
    s_all = np.asarray(s_all, dtype=np.float64).ravel()
    n = int(np.count_nonzero(s_all <= f * s_all.max()))
    return float(good[min(max(n, 1), good.size) - 1])
