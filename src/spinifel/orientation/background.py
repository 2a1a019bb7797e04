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

Why not from that relation alone. The model is merged from the data minus the previous
estimate ``b'``, so its orientation average carries a flat part ``(b - b') / a`` wherever the
signal is above it, and the least-squares fit of the mean image on ``(<W>, 1)`` then returns
``b'`` itself, whatever ``b``: the fit has no information on ``b``, and small biases
(orientations still wrong, a blurred early model with too much intensity at high ``|s|``, a
Tikhonov pull, the log floor) accumulate from generation to generation. Measured on 2CEX
(600 images, 2,000 photons, fluence sigma 0.5, ``b = 0.05``, 4 gap rows, ``M = 31``): the
model fit gave 0.00, 0.00, 0.01, 0.02, 0.04, 0.07, 0.10, 0.11, 0.11, 0.11, 0.10 in
generations 1-11, while the model's ``<W>`` in the outer shells went from about 1.5 times
the truth's (generation 5, blurred model) to 0.35-0.8 times (generation 9, too much
subtracted); the same fit with the truth's ``<W>`` gave 0.053-0.065 (0.053 once all pixels
are matched).

* ``flat`` (``b_p = b``), from the data alone (:func:`flat_background_from_data`, once,
  before the first generation). Per image ``k`` and shell ``s``, the photon count
  ``x_ks ~ phi_k S_s(R_k) + b P_s``: the signal scales with the fluence, the background
  does not. Over the images, the covariance of two shells ``s, t`` far enough apart
  (``|s - t| >= 2``: nearby shells share speckles, so their orientation fluctuations
  correlate) is ``var(phi) S_s S_t``, rank one: its loadings ``l_s = sd(phi) S_s`` are the
  signal's radial profile up to one factor, measured from the data, not from the model.
  Then the mean per pixel of each shell is ``m_s = kappa l_s / P_s + b``
  (``kappa = mean(phi) / sd(phi)``), and a weighted least squares over the shells
  (weights ``1 / var(m_s)``) gives ``b`` (``>= 0``). Its standard error is a jackknife over
  :data:`JACKKNIFE_GROUPS` groups of images; it grows as the fluence spread shrinks, and
  without a spread ``b`` is not identifiable from the data (a flat part of the signal and
  a background are then the same thing). On the 2CEX data above it gave 0.0498 (bootstrap
  error 0.0015); on the synthetic problem of the tests, 0.0498 +- 0.0015 over six repeats
  (fluence sigma 0.3). With it, :func:`estimate_background` takes only ``a`` from the
  model: ``sum_p (mean image - b) / sum_p <W>`` (photons over slice sums, as the score's
  fluences; a least-squares ``a`` is ruled by the brightest pixels, and a poor early model
  with too sharp a centre gave 0.15 where the mean fluence is 1). The pipeline falls back
  to the model fit below when the error exceeds a tenth of the dimmest shell's mean count
  (:data:`spinifel.pipeline.problem.MAX_FLAT_BACKGROUND_ERROR`; e.g. fluence sigma 0.1 on
  the tests' problem, where the data estimate is also biased high).
* ``flat`` without the data's estimate (``flat=None``): linear least squares of the mean
  image on ``(<W>_p, 1)`` over the good pixels gives ``a`` and ``b`` together. Fitting
  ``a`` here matters: a fluence from photon counts (``N_k / S``) counts background photons
  as signal, and with it the flat residual is exactly 0 whatever ``b``. ``b < 0`` is
  clamped to 0 and ``a`` refitted without it. Unbiased given the true ``<W>``, but subject
  to the feedback above.
* ``radial`` (``b_p = b_s`` per ``|s|`` shell), from the data alone
  (:func:`radial_background_from_data`): the same fit with ``b_s`` a quadratic in the
  shell radius instead of a constant. A free ``b_s`` per shell is not identifiable from
  the shell moments (``S`` means against ``S`` offsets plus ``kappa``); a low-degree
  polynomial is, since the signal's profile is steep and oscillates. It takes more
  fluence spread than ``flat`` for the same error (three parameters instead of one).
* ``radial`` without the data's estimate (fallback): ``<W>`` is constant on a shell, so
  ``a`` and ``b_s`` cannot be separated shell by shell; ``a`` comes from the model's flat
  fit, then ``b_s = max(0, mean_{p in s}(mean_k K_kp - a <W>_p))``, with the feedback above
  shell by shell.

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


#: Groups of images (by global index modulo) whose moments are kept apart for the
#: jackknife error of :func:`flat_background_from_data`.
JACKKNIFE_GROUPS = 8


def shell_moments(images: Any, shells: np.ndarray, n_shells: int,
                  index: np.ndarray | None = None) -> np.ndarray:
    """Sufficient statistics of the per-image shell sums, per jackknife group, to be summed
    over the ranks.

    Parameters
    ----------
    images : array (n, P)
        Photon counts at the good pixels (any array module).
    shells : ndarray (P,) int
        Shell of each good pixel (:func:`shell_index`).
    n_shells : int
        Number of shells ``S``.
    index : ndarray (n,) int or None
        Global index of each image (its group is ``index % JACKKNIFE_GROUPS``); None:
        ``0 .. n-1``.

    Returns
    -------
    ndarray (JACKKNIFE_GROUPS, S + 2, S) float64
        Per group, row 0: ``sum_k x_ks``; rows ``1 .. S``: ``sum_k x_ks x_kt``; row
        ``S + 1``: the number of images (every column), where ``x_ks`` is image ``k``'s
        photon count in shell ``s``. Host.
    """
    xp = get_array_module(images)
    onehot = np.zeros((len(shells), n_shells))
    onehot[np.arange(len(shells)), shells] = 1.0
    x = to_module(images, xp, dtype=np.float64) @ to_module(onehot, xp)
    x = np.asarray(to_module(x, np), dtype=np.float64)
    index = np.arange(len(x)) if index is None else np.asarray(index)
    out = np.zeros((JACKKNIFE_GROUPS, n_shells + 2, n_shells))
    for g in range(JACKKNIFE_GROUPS):
        xg = x[index % JACKKNIFE_GROUPS == g]
        out[g, 0], out[g, 1:-1], out[g, -1] = xg.sum(axis=0), xg.T @ xg, len(xg)
    return out


def _rank_one_off_diagonal(cov: np.ndarray, gap: int, iterations: int = 200) -> np.ndarray:
    """Loadings ``l`` with ``cov_st ~ l_s l_t`` over the pairs ``|s - t| >= gap`` (alternating
    least squares from ``sqrt(diag)``); the diagonal and near-diagonal pairs are not used."""
    n = cov.shape[0]
    use = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) >= gap
    load = np.sqrt(np.maximum(np.diag(cov), 0.0))
    for _ in range(iterations):
        num = np.where(use, cov, 0.0) @ load
        den = np.where(use, 1.0, 0.0) @ (load * load)
        load = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    return load


def _fluence_factor_fit(moments: np.ndarray, pixels: np.ndarray, gap: int,
                        degree: int = 0) -> np.ndarray:
    """The unclamped background per shell (S,) from summed moments (S + 2, S): weighted
    least squares of the per-pixel shell means on the signal profile and a polynomial of
    ``degree`` in the shell radius (0: :func:`flat_background_from_data`; 2:
    :func:`radial_background_from_data`). Shells without pixels get 0."""
    n = max(moments[-1, 0], 2.0)
    mean = moments[0] / n
    cov = (moments[1:-1] / n - np.outer(mean, mean)) * (n / (n - 1))
    keep = pixels > 0
    mean, cov, npix = mean[keep], cov[np.ix_(keep, keep)], pixels[keep].astype(np.float64)
    load = _rank_one_off_diagonal(cov, gap)
    m, nu = mean / npix, load / npix  # per pixel: m_s = kappa nu_s + b_s
    radius = (np.arange(len(pixels)) + 0.5) / len(pixels)  # shell radius / outer radius
    powers = np.stack([radius[keep] ** d for d in range(degree + 1)], axis=1)
    weight = npix ** 2 * n / np.maximum(np.diag(cov), 1e-300)  # 1 / var(m_s)
    design = np.concatenate([nu[:, None], powers], axis=1) * np.sqrt(weight)[:, None]
    coef, *_ = np.linalg.lstsq(design, m * np.sqrt(weight), rcond=None)
    out = np.zeros(len(pixels))
    out[keep] = powers @ coef[1:]
    return out


def _jackknife(moments: np.ndarray, pixels: np.ndarray, gap: int,
               degree: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_fluence_factor_fit` on all images and its jackknife standard error over the
    groups of :func:`shell_moments` (per shell)."""
    total = moments.sum(axis=0)
    b = _fluence_factor_fit(total, pixels, gap, degree)
    groups = [g for g in range(len(moments)) if moments[g, -1, 0] > 0]
    loo = np.array([_fluence_factor_fit(total - moments[g], pixels, gap, degree)
                    for g in groups])
    k = len(loo)
    if k < 2:
        return b, np.full_like(b, np.inf)
    return b, np.sqrt((k - 1) / k * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))


def flat_background_from_data(moments: np.ndarray, pixels: np.ndarray,
                              gap: int = 2) -> tuple[float, float]:
    """Flat background from the data alone: the share of the counts that does not scale
    with the per-image fluence (module doc, "Estimate"), and its jackknife error.

    Parameters
    ----------
    moments : ndarray (G, S + 2, S)
        :func:`shell_moments` summed over all images (every rank).
    pixels : ndarray (S,) int
        Good pixels per shell.
    gap : int
        Shell pairs closer than this are left out of the covariance fit (their orientation
        fluctuations are correlated: the same speckles).

    Returns
    -------
    b : float
        Background photons per pixel, ``>= 0``.
    error : float
        Its standard error: jackknife over the ``G`` groups of images. It grows as the
        fluence spread shrinks; without one the background is not identifiable from the
        data (the error is then of the order of the counts themselves).
    """
    pixels = np.asarray(pixels)
    b, err = _jackknife(moments, pixels, gap, 0)
    s = int(np.argmax(pixels > 0))
    return max(float(b[s]), 0.0), float(err[s])


def radial_background_from_data(moments: np.ndarray, pixels: np.ndarray, gap: int = 2,
                                degree: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Radial background from the data alone: as :func:`flat_background_from_data` with
    ``b_s`` a polynomial of ``degree`` in the shell radius instead of a constant.

    A free ``b_s`` per shell is not identifiable from these moments (``S`` shell means
    against ``S`` offsets and the one factor ``kappa``); a low-degree polynomial is, since
    the signal's profile (steep, with speckle oscillations) is not one.

    Returns
    -------
    b : ndarray (S,) float64
        Photons per pixel in each shell, ``>= 0`` (0 in shells without pixels).
    error : ndarray (S,) float64
        Jackknife standard error per shell.
    """
    b, err = _jackknife(moments, np.asarray(pixels), gap, degree)
    return np.maximum(b, 0.0), err


def estimate_background(mean_image: Any, mean_slice: Any, mode: str,
                        shells: np.ndarray | None = None,
                        from_data: Any = None) -> tuple[np.ndarray, float]:
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
    from_data : float, array (P,) or None
        ``flat`` and ``radial``: the background from the data
        (:func:`flat_background_from_data`: a float; :func:`radial_background_from_data`:
        per pixel); then only ``a`` comes from the model: the signal photons over the
        model's, ``sum(mean_image - b) / sum(mean_slice)`` (as the score's fluences, photons
        over slice sums). None: ``a`` and ``b`` both from the model fit (not identifiable
        against the model's own flat part once the merge has subtracted a background;
        module doc).

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
    if from_data is not None:
        b = np.broadcast_to(np.asarray(to_module(from_data, np), dtype=np.float64),
                            m.shape).copy()
        return b, float(np.sum(m - b) / max(np.sum(w), 1e-300))
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
