"""Background photons per pixel: estimate from the data and the model, and its use.

Model. Each photon-count image is ``K_kp ~ Poisson(phi_k W_jp + b_p)``: the signal of the
model slice ``W_j`` at the image's fluence plus a background ``b_p`` (photons per good
pixel, the same in every image: scattering by gas, the jet, detector dark counts).

Estimate (:func:`estimate_background`). Averaged over the ``n`` images, the expected mean
image is::

    mean_k K_kp = a <W>_p + b_p,      a = mean_k phi_k,

where ``<W>_p`` is the model's orientation-averaged intensity at pixel ``p``: the mean of
the model slices over the orientation grid (:attr:`Posterior.mean_slice`, accumulated while
the slices stream through the score; for a uniform grid it is the spherical average of the
3D intensity at ``|s_p|``). Averaging over random orientations in the data is the same
average, so the relation holds whatever the images' orientations.

* ``flat`` (``b_p = b``): linear least squares of the mean image on ``(<W>_p, 1)`` over the
  good pixels gives ``a`` and ``b`` together. They are separable because ``<W>`` falls with
  ``|s|`` (by orders of magnitude) while ``b`` does not; fitting ``a`` here matters: a
  fluence from photon counts (``N_k / S``) counts background photons as signal, and with
  it the flat residual is exactly 0 whatever ``b``. ``b < 0`` is clamped to 0 and ``a``
  refitted without it.
* ``radial`` (``b_p = b_s`` per ``|s|`` shell): ``<W>`` is constant on a shell, so ``a``
  and ``b_s`` cannot be separated shell by shell; ``a`` comes from the flat fit, then
  ``b_s = max(0, mean_{p in s}(mean_k K_kp - a <W>_p))``. A background that is strongly
  radial biases that ``a`` (and hence all ``b_s``) by its non-flat part; the flat fit is
  the defensible default.

The statistical error of ``b`` is that of a mean over ``n P`` Poisson counts (plus the
fluence jitter's share), i.e. ``~ sqrt(mean K / (n P))`` for ``flat``.

Score. ``log(phi_k W + b)`` is not a GEMM of images with per-slice values. With a
reference fluence ``phi_ref`` (the fitted ``a``)::

    log(phi_k W_jp + b_p) = log phi_k + log(W_jp + b_p / phi_k)
                          ~ log phi_k + log(W_jp + b_p / phi_ref),

so the score runs on the shifted slices ``W' = W + b / phi_ref`` (exact for images with
``phi_k = phi_ref``; for others the background's share is mis-scaled by ``phi_ref/phi_k``,
a second-order effect while ``b`` is a few percent of the signal). The linear term
``sum_p (phi_k W_jp + b_p) = phi_k S_j + B`` differs from ``phi_k S'_j`` by a constant in
``j``, so :func:`spinifel.orientation.likelihood.score_orientations` takes
``background_per_fluence = b / phi_ref`` and adds it to every slice; the posterior is then
the Poisson one of the model with background.

Merge. The data minus ``b`` estimate the signal ``phi_k W``
(:func:`spinifel.merging.probabilistic.accumulate_posterior_normal_equations`,
``background=b``), so the merged intensity is unbiased; ignoring ``b`` adds ``b / phi`` to
every voxel the images reach.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module

BACKGROUND_MODES = ("none", "flat", "radial")


def shell_index(positions: Any, n_shells: int) -> np.ndarray:
    """Equal-width ``|s|`` shell of every good pixel, from 0 to the largest ``|s|``.

    Parameters
    ----------
    positions : array (3, P)
        Reciprocal positions of the good pixels (any unit).
    n_shells : int
        Number of shells, ``>= 1``.

    Returns
    -------
    ndarray (P,) int64
        Shell of each pixel in ``0 .. n_shells - 1`` (host).
    """
    r = np.linalg.norm(np.asarray(to_module(positions, np), dtype=np.float64), axis=0)
    top = r.max() if r.size and r.max() > 0 else 1.0
    return np.minimum((r / top * n_shells).astype(np.int64), n_shells - 1)


def _flat_fit(mean_image: np.ndarray, mean_slice: np.ndarray) -> tuple[float, float]:
    """Least squares ``mean_image ~ a mean_slice + b`` with ``b >= 0``; returns ``(a, b)``."""
    design = np.stack([mean_slice, np.ones_like(mean_slice)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, mean_image, rcond=None)
    if b < 0:
        a, b = float(mean_image @ mean_slice / max(mean_slice @ mean_slice, 1e-300)), 0.0
    return float(a), float(b)


def estimate_background(mean_image: Any, mean_slice: Any, mode: str,
                        shells: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Background per good pixel and the mean fluence, from the mean image and the model.

    Parameters
    ----------
    mean_image : array (P,)
        Mean over ALL images (every rank's, after a sum Allreduce) of the photon counts at
        the good pixels.
    mean_slice : array (P,)
        ``<W>_p``: the model slices (fluence 1) averaged over the orientation grid
        (:attr:`spinifel.orientation.likelihood.Posterior.mean_slice`).
    mode : {"none", "flat", "radial"}
        See the module doc.
    shells : ndarray (P,) int or None
        Shell of each pixel (:func:`shell_index`); required for ``radial``.

    Returns
    -------
    background : ndarray (P,) float64
        ``b_p`` in photons per pixel, ``>= 0`` (zeros for ``none``); host.
    mean_fluence : float
        ``a``, the fitted mean signal fluence (the ``phi_ref`` of the score; for ``none``
        the least-squares scale without background).
    """
    m = np.asarray(to_module(mean_image, np), dtype=np.float64)
    w = np.asarray(to_module(mean_slice, np), dtype=np.float64)
    if mode not in BACKGROUND_MODES:
        raise ValueError(f"background mode must be one of {BACKGROUND_MODES}, got {mode!r}")
    if mode == "none":
        return np.zeros_like(m), float(m @ w / max(w @ w, 1e-300))
    a, b = _flat_fit(m, w)
    if mode == "flat":
        return np.full_like(m, b), a
    if shells is None:
        raise ValueError("radial background needs the pixels' shells")
    n = int(shells.max()) + 1
    resid = np.bincount(shells, m - a * w, n) / np.maximum(np.bincount(shells, None, n), 1)
    return np.maximum(resid, 0.0)[shells], a


def background_per_fluence(background: Any, mean_fluence: float, like: Any = None) -> Any:
    """``b / phi_ref``: what the score adds to every slice (on the module of ``like``)."""
    xp = get_array_module(like)
    b = to_module(background, xp, dtype=np.float64)
    return b / float(mean_fluence) if mean_fluence > 0 else b * 0.0
