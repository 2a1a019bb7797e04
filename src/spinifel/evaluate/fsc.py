"""Fourier shell correlation, resolution estimates and Pearson correlations.

All volumes are cubic ``(M, M, M)`` grids with real-space voxel size ``d`` (angstrom).
Reciprocal shells have width one reciprocal voxel ``1 / (M d)`` (inverse angstrom, no
``2 pi``), shell ``k`` holding the Fourier coefficients whose radius rounds to ``k``.
These functions run on the host (numpy); device arrays are copied first.
"""

from __future__ import annotations

import numpy as np


def to_host(x: object) -> np.ndarray:
    """Return ``x`` as a numpy array, copying CuPy-style device arrays (``.get()``) to the host."""
    if not isinstance(x, np.ndarray) and hasattr(x, "get"):
        x = x.get()
    return np.asarray(x)


def _check_cube(name: str, a: np.ndarray) -> None:
    if a.ndim != 3 or not (a.shape[0] == a.shape[1] == a.shape[2]):
        raise ValueError(f"{name} must be a cubic (M, M, M) volume, got shape {a.shape}")


def shell_index(m: int) -> np.ndarray:
    """Integer shell radius ``round(|k|)`` of every voxel of a centred ``(m, m, m)`` grid.

    Index ``l`` along an axis has offset ``k = l - (m - 1) / 2`` from the centre voxel (for
    even ``m`` the offset of ``fftshift`` order, ``l - m // 2``). Returns int64 ``(m, m, m)``.
    """
    k = np.arange(m) - m // 2
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return np.rint(np.sqrt(r2)).astype(np.int64)


def fsc(a: object, b: object, voxel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two real-space volumes.

    Parameters
    ----------
    a, b : array, shape (M, M, M), real
        Densities on the same grid (already aligned).
    voxel_size_angstrom : float
        Real-space voxel size ``d`` in angstrom.

    Returns
    -------
    freq_inv_angstrom : ndarray, shape (M // 2 + 1,), float64
        Shell radii ``k / (M d)``, ``k = 0 .. M // 2`` (up to Nyquist ``1 / (2 d)``; for odd
        ``M`` the last shell is ``(M - 1) / (2 M d)``).
    fsc : ndarray, shape (M // 2 + 1,), float64
        ``Re sum F_a conj(F_b) / sqrt(sum |F_a|^2 sum |F_b|^2)`` over each shell; ``nan``
        where a shell holds no power in ``a`` or ``b``. Corner voxels beyond the last shell
        are ignored.
    """
    a = to_host(a).astype(np.float64)
    b = to_host(b).astype(np.float64)
    _check_cube("a", a)
    if a.shape != b.shape:
        raise ValueError(f"fsc needs volumes of one shape, got {a.shape} and {b.shape}")
    if not voxel_size_angstrom > 0:
        raise ValueError(f"voxel_size_angstrom must be > 0, got {voxel_size_angstrom}")
    m = a.shape[0]
    # Shells do not depend on a common phase ramp, so no ifftshift is needed; fftshift
    # puts the coefficients in the centred order of shell_index.
    fa = np.fft.fftshift(np.fft.fftn(a))
    fb = np.fft.fftshift(np.fft.fftn(b))
    return _shell_ratio(fa, fb, m, voxel_size_angstrom)


def _shell_ratio(fa: np.ndarray, fb: np.ndarray, m: int,
                 voxel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    n_shells = m // 2 + 1
    shells = shell_index(m).ravel()
    keep = shells < n_shells
    shells = shells[keep]
    fa = fa.ravel()[keep]
    fb = fb.ravel()[keep]
    num = np.bincount(shells, weights=np.real(fa * np.conj(fb)), minlength=n_shells)
    pa = np.bincount(shells, weights=np.abs(fa) ** 2, minlength=n_shells)
    pb = np.bincount(shells, weights=np.abs(fb) ** 2, minlength=n_shells)
    den = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    freq = np.arange(n_shells) / (m * voxel_size_angstrom)
    return freq, curve


def intensity_shell_correlation(a: object, b: object,
                                voxel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of two centred 3D intensities shell by shell.

    Parameters
    ----------
    a, b : array, shape (M, M, M), real
        Intensities on the centred reciprocal grid of the architecture notes (voxel
        ``1 / (M d)``), in one frame (no hand or shift ambiguity).
    voxel_size_angstrom : float
        Real-space voxel size ``d`` in angstrom.

    Returns
    -------
    freq_inv_angstrom, corr : ndarray, shape (M // 2 + 1,), float64
        Shell radius ``k / (M d)`` and the Pearson correlation of the values in shell ``k``
        (``nan`` for shells with constant values, e.g. the single-voxel shell 0).
    """
    a = to_host(a).astype(np.float64)
    b = to_host(b).astype(np.float64)
    _check_cube("a", a)
    if a.shape != b.shape:
        raise ValueError(f"shell correlation needs volumes of one shape, got {a.shape} "
                         f"and {b.shape}")
    m = a.shape[0]
    n_shells = m // 2 + 1
    shells = shell_index(m).ravel()
    keep = shells < n_shells
    shells, a, b = shells[keep], a.ravel()[keep], b.ravel()[keep]
    cnt = np.bincount(shells, minlength=n_shells).astype(np.float64)
    ma = np.bincount(shells, weights=a, minlength=n_shells) / cnt
    mb = np.bincount(shells, weights=b, minlength=n_shells) / cnt
    da = a - ma[shells]
    db = b - mb[shells]
    num = np.bincount(shells, weights=da * db, minlength=n_shells)
    den = np.sqrt(np.bincount(shells, weights=da * da, minlength=n_shells)
                  * np.bincount(shells, weights=db * db, minlength=n_shells))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.arange(n_shells) / (m * voxel_size_angstrom), corr


def resolution_at(freq: object, curve: object, threshold: float,
                  nyquist_angstrom: float | None = None) -> float:
    """Resolution in angstrom where a shell-correlation curve first drops below ``threshold``.

    Parameters
    ----------
    freq : array, shape (n,)
        Increasing shell frequencies, inverse angstrom.
    curve : array, shape (n,)
        Correlation per shell; ``nan`` entries are skipped.
    threshold : float
        E.g. 0.5 or 0.143.
    nyquist_angstrom : float, optional
        Returned when the curve never drops below the threshold; defaults to ``1 / freq[-1]``
        (the finest shell, which is the Nyquist resolution ``2 d`` for even ``M`` and
        ``2 d M / (M - 1)`` for odd ``M``). Pass ``2 d`` to get exactly ``2 d``.

    Returns
    -------
    float
        ``1 / f`` where ``f`` is the linear interpolation of the crossing between the last
        shell at or above the threshold and the first below it; ``inf`` if the first finite
        value is already below the threshold at zero frequency; ``nan`` if the curve has no
        finite value.
    """
    value, status, limit = crossing(freq, curve, threshold)
    if status == "empty":
        return float("nan")
    if status == "not reached":
        if nyquist_angstrom is not None:
            return float(nyquist_angstrom)
        return float("inf") if limit is None else limit
    if status == "below":  # below from the first finite shell on
        f = to_host(freq).astype(np.float64).ravel()
        f0 = f[np.isfinite(to_host(curve).astype(np.float64).ravel()) & np.isfinite(f)][0]
        return float(1.0 / f0) if f0 > 0 else float("inf")
    return float("inf") if value is None else value


def pearson(a: object, b: object, mask: object | None = None) -> float:
    """Pearson correlation coefficient of two arrays of one shape (optionally over ``mask``).

    Returns ``nan`` when either array is constant over the selected elements.
    """
    a = to_host(a).astype(np.float64)
    b = to_host(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson needs arrays of one shape, got {a.shape} and {b.shape}")
    if mask is not None:
        m = to_host(mask).astype(bool)
        if m.shape != a.shape:
            raise ValueError(f"mask shape {m.shape} does not match array shape {a.shape}")
        a, b = a[m], b[m]
    a = a.ravel() - a.mean() if a.size else a.ravel()
    b = b.ravel() - b.mean() if b.size else b.ravel()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if not den > 0:
        return float("nan")
    return float(np.dot(a, b) / den)


def crossing(freq: object, curve: object, threshold: object) -> tuple[float | None, str, float | None]:
    """Where a shell curve first drops below a threshold, saying when it does not.

    Parameters
    ----------
    freq : array, shape (n,)
        Increasing shell frequencies, inverse angstrom.
    curve : array, shape (n,)
        Value per shell; ``nan`` entries are skipped.
    threshold : float or array, shape (n,)
        Cut-off, one for all shells or one per shell.

    Returns
    -------
    resolution : float or None
        ``1 / f`` at the linear interpolation of the first crossing (angstrom); None when
        the curve never drops below the threshold or is below it from its first finite
        shell on (nothing resolved), or has no finite value.
    status : str
        "crossed", "not reached" (never below: the resolution is better than the finest
        shell), "below" (below from the first shell on) or "empty".
    better_than : float or None
        ``1 / f`` of the finest finite shell (angstrom): the limit of the measurement.
    """
    f = to_host(freq).astype(np.float64).ravel()
    c = to_host(curve).astype(np.float64).ravel()
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), f.shape)
    if f.shape != c.shape:
        raise ValueError(f"freq and curve must have one length, got {f.size} and {c.size}")
    ok = np.isfinite(c) & np.isfinite(f) & np.isfinite(t)
    f, c, t = f[ok], c[ok], t[ok]
    if f.size == 0:
        return None, "empty", None
    limit = float(1.0 / f[-1]) if f[-1] > 0 else None
    below = np.nonzero(c < t)[0]
    if below.size == 0:
        return None, "not reached", limit
    i = int(below[0])
    if i == 0:
        return None, "below", limit
    # linear interpolation of (curve - threshold) between shells i-1 and i
    d0, d1 = c[i - 1] - t[i - 1], c[i] - t[i]
    fc = f[i - 1] + (f[i] - f[i - 1]) * d0 / (d0 - d1) if d0 != d1 else f[i]
    return (float(1.0 / fc) if fc > 0 else None), "crossed", limit


def format_resolution(value: float | None, status: str | None = None,
                      better_than: float | None = None) -> str:
    """Text for a log line: ``"6.4 A"``, ``"not reached (better than 6.4 A)"`` or
    ``"none (below the threshold from the first shell)"``."""
    if value is not None and (status in (None, "crossed")) and np.isfinite(value):
        return f"{value:.1f} A"
    if status == "not reached":
        return ("not reached" + (f" (better than {better_than:.1f} A)"
                                 if better_than is not None else ""))
    if status == "below":
        return "none (below the threshold from the first shell)"
    return "n/a"


def resolution_fields(prefix: str, freq: object, curve: object, threshold: float,
                      nyquist_angstrom: float | None = None) -> dict:
    """The JSON fields of one threshold crossing, for evaluation.json and metrics.json.

    Returns ``{prefix + "_angstrom": resolution or None, prefix + "_reached": bool,
    prefix + "_status": status, prefix + "_better_than_angstrom": limit}`` from
    :func:`crossing`; ``limit`` is ``nyquist_angstrom`` when given, else the finest shell.
    A curve that never drops below the threshold gives no resolution (it is better than
    the limit of the measurement, not equal to it).
    """
    res, status, limit = crossing(freq, curve, threshold)
    if nyquist_angstrom is not None:
        limit = float(nyquist_angstrom)
    return {f"{prefix}_angstrom": res, f"{prefix}_reached": status == "crossed",
            f"{prefix}_status": status, f"{prefix}_better_than_angstrom": limit}


def describe_resolution(doc: dict, prefix: str) -> str:
    """Log text of the fields written by :func:`resolution_fields` (old documents without
    the status field are formatted from the value alone)."""
    return format_resolution(doc.get(f"{prefix}_angstrom"), doc.get(f"{prefix}_status"),
                             doc.get(f"{prefix}_better_than_angstrom"))
