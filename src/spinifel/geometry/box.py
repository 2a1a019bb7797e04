"""Box size from the data: particle diameter, grid size ``M`` and edge warnings (issue 13).

The reconstruction grid has ``M`` voxels of ``d = 1 / (2 s_max)`` per axis (``s_max`` the
detector's reciprocal extent; :mod:`spinifel.simulate.truth`). The autocorrelation of a
particle of largest dimension ``D`` reaches ``|r| = D``; the merge constrains it to the ball
support of radius ``ac_support_radius * (M - 1) / 2`` voxels
(:func:`spinifel.merging.merge.ball_support`), so with the default radius 1 the box needs
``(M - 1) / 2 >= D / d``, i.e. ``M >= 2 D / d + 1`` (equivalently the reciprocal grid spacing
``1 / (M d)`` samples the intensity at its Nyquist rate ``1 / (2 D)``, and the density
occupies at most half the box, as phasing needs). :func:`choose_M` adds a relative margin.

Estimating ``D`` without a model:

* :func:`estimate_diameter` (before any merge): the rotational average of the images is the
  particle's spherically averaged intensity ``I(s)``, which is the transform of its
  pair-distance distribution ``p(r)`` (the small-angle scattering relation
  ``I(s) = c + sum_r p(r) sinc(2 pi s r)``, ``c`` a flat background). ``p(r) >= 0`` is fitted
  by non-negative least squares on ``r <= D_fit`` for growing ``D_fit``; the smallest
  ``D_fit`` whose reduced chi-square reaches ``chi2_target`` (errors: the standard error of
  each radial bin plus ``model_error`` of its value) is the size the speckles resolve. The
  longest atom pairs weigh too little to be seen, so ``D_fit`` under-estimates the largest
  dimension by a shape-dependent factor: measured 0.72-0.76 (built-in molecule, 58.0 A),
  0.75-0.81 (2CEX, 67.8 A) and 0.64-0.70 (1EI7, 92.2 A, elongated); ``diameter = calibration
  * D_fit`` with ``calibration = 1.4`` (an over-estimate costs a larger grid, an
  under-estimate a truncated autocorrelation). Measured with 1000 images (noise-free on the
  default 64 x 64 detector at 6 keV / with 500 photons, fluence jitter 0.5, background 0.05
  and a 4-row gap on issue 13's 4.6 keV detector): built-in 61.6 / 58.8 A, 2CEX 77.0 /
  71.4 A, 1EI7 91.0 / 82.6 A.
  It needs the low-``s`` speckles: ``reliable`` is False when the smallest measured ``|s|``
  exceeds ``1.5 / D`` (e.g. a beamstop of radius 14 pixels on 64 x 64 at 4.6 keV).
* :func:`diameter_from_autocorrelation` (after a merge): the radius where an autocorrelation
  falls below a fraction of its central value (largest over directions; an autocorrelation's
  extent is ``2 D``, its radius ``D``).

No function here imports MPI: :func:`radial_sums` returns per-rank sums that the caller
Allreduces before :func:`radial_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

M_MIN, M_MAX = 9, 513  # the range config.py accepts for algorithm.M
DEFAULT_MARGIN = 0.1
DEFAULT_CALIBRATION = 1.4


@dataclass(frozen=True)
class RadialProfile:
    """Rotational average of the images against ``|s|``.

    Attributes
    ----------
    s : ndarray, shape (n_bins,), float64
        Mean ``|s|`` of the pixels of each non-empty bin, inverse metres.
    mean : ndarray, shape (n_bins,), float64
        Mean pixel value (images' units) of the bin over all images.
    sem : ndarray, shape (n_bins,), float64
        Standard error of ``mean`` (spread of the pixel values over images and pixels
        of the bin divided by the square root of their number).
    """

    s: np.ndarray
    mean: np.ndarray
    sem: np.ndarray


@dataclass(frozen=True)
class DiameterEstimate:
    """Result of :func:`estimate_diameter`.

    Attributes
    ----------
    diameter_m : float
        Estimated largest dimension, metres (``calibration * fitted_m``).
    fitted_m : float
        Smallest pair-distance support that fits the radial profile, metres.
    reduced_chi2 : float
        Chi-square per radial bin of the fit at ``fitted_m``.
    s_min : float
        Smallest ``|s|`` of the profile, inverse metres.
    reliable : bool
        ``s_min * diameter_m < 1.5``: the profile holds the first speckles (false, e.g.,
        with a beamstop of radius 14 pixels on issue 13's 64 x 64 detector).
    """

    diameter_m: float
    fitted_m: float
    reduced_chi2: float
    s_min: float
    reliable: bool


def radial_edges(s_norm: np.ndarray, n_bins: int = 48) -> np.ndarray:
    """``n_bins + 1`` equal bin edges spanning ``[min, max]`` of ``s_norm`` (inverse metres).

    Every rank must use the same edges: compute them from the (replicated) good pixels' ``|s|``.
    """
    s = np.asarray(s_norm, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    pad = 1e-9 * max(hi, 1e-300)
    return np.linspace(lo - pad, hi + pad, int(n_bins) + 1)


def radial_sums(images: np.ndarray, s_norm: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per-bin count, sum and sum of squares of the pixel values of this rank's images.

    Parameters
    ----------
    images : ndarray, shape (n_images, n_pixels), real
        Good pixels only (any units; photon counts or intensities).
    s_norm : ndarray, shape (n_pixels,)
        ``|s|`` of those pixels, inverse metres.
    edges : ndarray, shape (n_bins + 1,)
        From :func:`radial_edges`.

    Returns
    -------
    ndarray, shape (3, n_bins), float64
        Rows: number of (image, pixel) samples, their sum, their sum of squares. Sum them
        over ranks (an Allreduce) and pass the total to :func:`radial_profile`.
    """
    img = np.asarray(images, dtype=np.float64)
    n_bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, np.asarray(s_norm, dtype=np.float64),
                                  side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins) * float(img.shape[0])
    total = np.bincount(idx, img.sum(axis=0), minlength=n_bins)
    squares = np.bincount(idx, (img * img).sum(axis=0), minlength=n_bins)
    return np.stack([count, total, squares])


def radial_profile(sums: np.ndarray, s_norm: np.ndarray, edges: np.ndarray) -> RadialProfile:
    """Profile from the (all-rank) :func:`radial_sums`; empty bins are dropped.

    ``s_norm`` and ``edges`` are those given to :func:`radial_sums`; a bin's ``s`` is the mean
    ``|s|`` of its pixels.
    """
    count, total, squares = np.asarray(sums, dtype=np.float64)
    s = np.asarray(s_norm, dtype=np.float64)
    n_bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    npix = np.bincount(idx, minlength=n_bins)
    ok = (count > 0) & (npix > 0)
    mean = total[ok] / count[ok]
    var = np.maximum(squares[ok] / count[ok] - mean * mean, 0.0)
    s_mean = np.bincount(idx, s, minlength=n_bins)[ok] / npix[ok]
    return RadialProfile(s=s_mean, mean=mean, sem=np.sqrt(var / count[ok]))


def fit_pair_distances(profile: RadialProfile, d_max_m: float, *, dr_m: float = 1e-10,
                       model_error: float = 0.01) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Non-negative ``p(r)`` on ``0 < r <= d_max_m`` and a flat term fitting the profile.

    Model: ``mean(s) = c + sum_j p_j sinc(2 pi s r_j)`` (``sinc(x) = sin(x) / x``), ``r_j = j
    dr_m``, ``c, p_j >= 0``, each bin weighted by ``1 / (sem + model_error * |mean|)``.

    Returns
    -------
    r : ndarray, shape (n_r,), metres
    p : ndarray, shape (n_r,), the profile's units
    c : float
        Flat term.
    reduced_chi2 : float
        Weighted residual sum of squares per bin.
    """
    from scipy.optimize import nnls

    s = profile.s
    r = np.arange(1, int(np.floor(d_max_m / dr_m + 1e-9)) + 1) * dr_m
    a = np.hstack([np.ones((s.size, 1)), np.sinc(2.0 * s[:, None] * r[None, :])])
    w = 1.0 / (profile.sem + model_error * np.abs(profile.mean) + 1e-300)
    coef, res = nnls(a * w[:, None], profile.mean * w, maxiter=100 * a.shape[1])
    return r, coef[1:], float(coef[0]), float(res * res / s.size)


def estimate_diameter(profile: RadialProfile, *, model_error: float = 0.01,
                      chi2_target: float = 0.5, dr_m: float = 1e-10,
                      calibration: float = DEFAULT_CALIBRATION) -> DiameterEstimate:
    """Largest particle dimension from the radial profile (module docstring).

    Scans ``D_fit = 10 dr_m, 11 dr_m, ...`` up to ``1 / (2 Delta s)`` (the largest distance the
    bin spacing ``Delta s`` samples) and stops at the first fit with reduced chi-square
    ``<= chi2_target``; when none reaches it, the best fit's ``D_fit`` is used.

    Raises
    ------
    ValueError
        If the profile has fewer than 8 bins.
    """
    if profile.s.size < 8:
        raise ValueError(f"the radial profile needs >= 8 non-empty bins, got {profile.s.size}")
    ds = float(np.median(np.diff(profile.s)))
    d_top = 0.5 / ds
    best = (np.inf, d_top)
    d = 10 * dr_m
    while d <= d_top:
        chi2 = fit_pair_distances(profile, d, dr_m=dr_m, model_error=model_error)[3]
        if chi2 < best[0]:
            best = (chi2, d)
        if chi2 <= chi2_target:
            break
        d += dr_m
    chi2, fitted = best if best[0] > chi2_target else (chi2, d)
    diameter = calibration * fitted
    s_min = float(profile.s.min())
    return DiameterEstimate(diameter_m=float(diameter), fitted_m=float(fitted),
                            reduced_chi2=float(chi2), s_min=s_min,
                            reliable=bool(s_min * diameter < 1.5))


def radial_max(volume: np.ndarray) -> np.ndarray:
    """Largest ``|volume|`` on each shell of integer radius (voxels) about the centre voxel.

    Parameters
    ----------
    volume : ndarray, shape (M, M, M)
        Centred grid (origin at index ``(M - 1) / 2``).

    Returns
    -------
    ndarray, shape (n_shells,), float64
        Entry ``k``: max over voxels with ``round(|r|) == k``.
    """
    v = np.abs(np.asarray(volume, dtype=np.float64))
    c = [np.arange(n) - (n - 1) / 2.0 for n in v.shape]
    r2 = c[0][:, None, None] ** 2 + c[1][None, :, None] ** 2 + c[2][None, None, :] ** 2
    k = np.rint(np.sqrt(r2)).astype(np.int64).ravel()
    out = np.zeros(k.max() + 1)
    np.maximum.at(out, k, v.ravel())
    return out


def diameter_from_autocorrelation(ac: np.ndarray, voxel_size_m: float,
                                  threshold: float = 0.02) -> float:
    """Particle diameter (metres) as the radius of an autocorrelation's support.

    The largest radius (voxels) at which some voxel of ``|ac|`` still exceeds ``threshold``
    times the central value, plus half a voxel, times ``voxel_size_m``. A spherically averaged
    autocorrelation (a merge from random orientations) gives an average rather than the
    largest dimension.

    Parameters
    ----------
    ac : ndarray, shape (M, M, M)
        Centred autocorrelation (origin at the centre voxel, its maximum).
    voxel_size_m : float
        Voxel edge, metres.
    threshold : float
        Fraction of ``ac`` at the origin.
    """
    prof = radial_max(ac)
    centre = float(np.abs(np.asarray(ac)[tuple(n // 2 for n in np.shape(ac))]))
    above = np.flatnonzero(prof > threshold * centre)
    return float((above.max() + 0.5) * voxel_size_m) if above.size else 0.0


def choose_M(diameter_m: float, reciprocal_extent: float, *, margin: float = DEFAULT_MARGIN,
             ac_support_radius: float = 1.0) -> int:
    """Smallest odd ``M`` whose autocorrelation support holds a particle of ``diameter_m``.

    ``M = smallest odd integer >= 2 (1 + margin) D / (ac_support_radius d) + 1`` with
    ``d = 1 / (2 reciprocal_extent)``, clipped to ``[9, 513]`` (module docstring). With the
    default margin 0.1 and ``ac_support_radius = 1``: the built-in molecule (58 A, d = 3.27 A)
    gets 41 (today's default), 2CEX (67.8 A, d = 3.22 A) 49 (``examples/2cex.toml`` uses 51,
    a 19 % margin), 1EI7 (92.2 A, d = 3.24 A) 65 (issue 13: "about 61", a 5 % margin). No
    single margin reproduces all three of today's choices; 0.1 sits between them.

    Parameters
    ----------
    diameter_m : float
        Largest particle dimension, metres, > 0.
    reciprocal_extent : float
        Largest detector ``|s|``, inverse metres.
    margin : float
        Relative margin on the diameter, >= 0.
    ac_support_radius : float
        ``algorithm.ac_support_radius``.
    """
    if not (np.isfinite(diameter_m) and diameter_m > 0):
        raise ValueError(f"diameter_m must be > 0 metres, got {diameter_m!r}")
    if not (np.isfinite(reciprocal_extent) and reciprocal_extent > 0):
        raise ValueError(f"reciprocal_extent must be > 0 per metre, got {reciprocal_extent!r}")
    voxel = 1.0 / (2.0 * reciprocal_extent)
    need = 2.0 * (1.0 + margin) * diameter_m / (ac_support_radius * voxel) + 1.0
    m = int(np.ceil(need - 1e-9))
    m += 1 - m % 2
    return int(min(max(m, M_MIN), M_MAX))


def support_touches_edge(volume: np.ndarray, support: np.ndarray | None = None, *,
                         width: int = 1) -> float:
    """How strongly ``volume`` reaches the edge of its box or support.

    Returns ``max |volume|`` over the outer shell (``width`` voxels) of ``support`` (the whole
    box when ``None``) divided by ``max |volume|`` over the support: near 0 when the
    density or autocorrelation fits with room to spare; a caller warns above a few
    percent (e.g. 0.05), meaning ``M`` (or ``ac_support_radius``) is too small.

    Parameters
    ----------
    volume : ndarray, shape (M, M, M)
    support : ndarray of bool, shape (M, M, M), optional
        E.g. :func:`spinifel.merging.merge.ball_support` for an autocorrelation.
    width : int
        Shell thickness in voxels, >= 1.
    """
    from scipy.ndimage import binary_erosion

    v = np.abs(np.asarray(volume, dtype=np.float64))
    sup = np.ones(v.shape, dtype=bool) if support is None else np.asarray(support, dtype=bool)
    inner = binary_erosion(sup, iterations=int(width), border_value=0)
    shell = sup & ~inner
    top = float(v[sup].max()) if sup.any() else 0.0
    if top <= 0 or not shell.any():
        return 0.0
    return float(v[shell].max() / top)
