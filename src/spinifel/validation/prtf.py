"""Phase retrieval transfer function (PRTF) of repeated, independent phasings.

For K densities ``rho_j`` phased from the same merged intensity from different random
starts and aligned onto one another, the PRTF at a reciprocal voxel ``k`` is

    PRTF(k) = | mean_j F_j(k) | / mean_j | F_j(k) |,

the length of the mean unit phasor weighted by amplitude: 1 where all runs agree on the
phase, about ``sqrt(pi / (4 K))`` where the phases are random (0.44 for K = 4, above the
customary cut-off ``1 / e``; Chapman et al., J. Opt. Soc. Am. A 23, 1179 (2006)), and
aligning the runs onto one another raises it further. So the cut-off used here is
``max(1/e, min(floor + 3 sigma, (1 + floor) / 2))`` per shell, ``floor`` the PRTF of K volumes with the runs'
mean amplitudes and independent random phases, aligned exactly like the runs (seeded,
measured each time), and ``sigma`` the spread of a shell mean of random-phase voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spinifel.evaluate.align import align_density
from spinifel.evaluate.fsc import crossing, shell_index, to_host

PRTF_THRESHOLD = float(np.exp(-1.0))


def align_runs(densities: Sequence[Any]) -> tuple[list[np.ndarray], list[str]]:
    """Align every density onto the first one (integer circular translation and hand).

    On the discrete grid the ambiguities of phase retrieval are exactly the circular
    integer shifts and the inversion, so no sub-voxel (Fourier) shift is used: it would
    ring and put negative values into the average density.

    Returns the aligned densities (float64, unscaled: the least-squares scale of
    :func:`~spinifel.evaluate.align.align_density` is undone, phasing fixes the scale) and
    the hand of each run relative to the first.
    """
    ref = to_host(densities[0]).astype(np.float64)
    out = [ref]
    hands = ["same"]
    for d in densities[1:]:
        aligned, info = align_density(to_host(d).astype(np.float64), ref, subvoxel=False)
        scale = info["scale"]
        out.append(aligned / scale if scale != 0 else aligned)
        hands.append(info["hand"])
    return out, hands


def prtf_curve(aligned: Sequence[np.ndarray], voxel_size_angstrom: float,
               fourier_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shell-averaged PRTF of aligned densities.

    Parameters
    ----------
    aligned : sequence of ndarray, shape (M, M, M), real
        K >= 2 densities in one frame (see :func:`align_runs`).
    voxel_size_angstrom : float
        Real-space voxel size ``d``, angstrom.
    fourier_mask : ndarray, shape (M, M, M), bool, optional
        Centred mask of the measured reciprocal voxels; only they are averaged (elsewhere
        the phasing imposed nothing and agreement means nothing).

    Returns
    -------
    freq_inv_angstrom, prtf : ndarray, shape (M // 2 + 1,), float64
        Shell radius ``k / (M d)`` and the mean per-voxel PRTF over the shell (``nan`` for
        a shell with no measured voxel of non-zero amplitude).
    """
    if len(aligned) < 2:
        raise ValueError(f"the PRTF needs at least 2 phasing runs, got {len(aligned)}")
    m = aligned[0].shape[0]
    # fftshift puts the coefficients in the centred order of shell_index; a common
    # real-space offset multiplies every run by one phase ramp and cancels in |mean|.
    f = np.stack([np.fft.fftshift(np.fft.fftn(np.asarray(a, dtype=np.float64))) for a in aligned])
    num = np.abs(f.mean(axis=0))
    den = np.abs(f).mean(axis=0)
    ok = den > 1e-12 * den.max()
    if fourier_mask is not None:
        ok &= np.asarray(fourier_mask, dtype=bool)
    ratio = np.where(ok, num / np.where(ok, den, 1.0), 0.0)
    n_shells = m // 2 + 1
    shells = shell_index(m)
    keep = ok & (shells < n_shells)
    cnt = np.bincount(shells[keep], minlength=n_shells).astype(np.float64)
    tot = np.bincount(shells[keep], weights=ratio[keep], minlength=n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(cnt > 0, tot / np.where(cnt > 0, cnt, 1.0), np.nan)
    return np.arange(n_shells) / (m * voxel_size_angstrom), curve


def random_phase_floor(aligned: Sequence[np.ndarray], voxel_size_angstrom: float,
                       fourier_mask: np.ndarray | None = None, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """PRTF of K aligned volumes with the runs' amplitudes and random phases.

    Parameters
    ----------
    aligned : sequence of K ndarray (M, M, M)
        The aligned runs (only their mean Fourier amplitude is used).
    voxel_size_angstrom, fourier_mask
        As for :func:`prtf_curve`.
    seed : int
        Seed of the random phases (the floor is reproducible).

    Returns
    -------
    floor, sigma : ndarray, shape (M // 2 + 1,), float64
        Shell PRTF of the random-phase volumes after :func:`align_runs` (``nan`` where
        :func:`prtf_curve` is), and the standard deviation of a shell mean of ``n`` voxels
        of random phases, ``sqrt((1 - pi/4) / K) / sqrt(n / 2)`` (Rayleigh statistics; a
        real density's Fourier voxels come in Friedel pairs, hence ``n / 2``).
    """
    k = len(aligned)
    m = aligned[0].shape[0]
    amp = np.mean([np.abs(np.fft.fftn(np.asarray(a, dtype=np.float64))) for a in aligned],
                  axis=0)
    rng = np.random.default_rng(seed)
    vols = [np.fft.ifftn(amp * np.exp(2j * np.pi * rng.random(amp.shape))).real
            for _ in range(k)]
    _, floor = prtf_curve(align_runs(vols)[0], voxel_size_angstrom, fourier_mask)
    shells = shell_index(m)
    keep = shells < m // 2 + 1
    if fourier_mask is not None:
        keep &= np.asarray(fourier_mask, dtype=bool)
    n = np.bincount(shells[keep], minlength=m // 2 + 1).astype(np.float64)
    with np.errstate(divide="ignore"):
        sigma = np.sqrt((1.0 - np.pi / 4.0) / k) / np.sqrt(np.maximum(n, 1.0) / 2.0)
    return floor, sigma


def prtf_threshold(floor: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-shell cut-off ``max(1/e, min(floor + 3 sigma, (1 + floor) / 2))`` (``1/e`` where
    the floor is nan and at zero frequency), shape of ``floor``."""
    # 3 sigma above the floor, but never more than half-way from the floor to 1 (a shell
    # of a few voxels has a large sigma; 1 is perfect agreement)
    f = np.where(np.isfinite(floor), np.minimum(floor + 3.0 * sigma, 0.5 * (1.0 + floor)), 0.0)
    f[0] = 0.0  # the zero-frequency shell: the mean density, its phase is 0 in every run
    return np.maximum(PRTF_THRESHOLD, f)


def prtf_summary(densities: Sequence[Any], voxel_size_angstrom: float,
                 fourier_mask: np.ndarray | None = None, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Align K phasing runs, compute the PRTF, its random-phase floor and the average density.

    Returns
    -------
    summary : dict
        ``freq_inv_angstrom``, ``prtf``, ``floor`` and ``threshold`` (lists per shell,
        None for an empty shell); ``resolution_angstrom`` where the PRTF first drops below
        the threshold (None when it does not: see ``status``); ``status``: "crossed",
        "not reached" (above the threshold in every shell: resolution better than
        ``better_than_angstrom``, the finest shell) or "below floor" (no shell beyond the
        first above the threshold: the phases are not reproducible);
        ``resolution_1_over_e_angstrom`` (the same crossing value, kept for old readers;
        None unless crossed); ``n_runs``; ``hands`` (relative to run 0).
    average : ndarray, shape (M, M, M), float64
        Mean of the aligned densities (>= 0 as each is).
    """
    aligned, hands = align_runs(densities)
    freq, curve = prtf_curve(aligned, voxel_size_angstrom, fourier_mask)
    floor, sigma = random_phase_floor(aligned, voxel_size_angstrom, fourier_mask, seed)
    thr = prtf_threshold(floor, sigma)
    res, status, limit = crossing(freq, curve, thr)
    nonzero = freq[freq > 0]
    if res is not None and nonzero.size and res > 1.0 / nonzero[0]:
        res, status = None, "below"  # only the zero-frequency shell was above
    status = {"below": "below floor"}.get(status, status)

    def _list(v: np.ndarray) -> list:
        return [None if not np.isfinite(x) else float(x) for x in v]

    summary = {"freq_inv_angstrom": [float(x) for x in freq], "prtf": _list(curve),
               "floor": _list(floor), "threshold": _list(np.where(np.isfinite(curve), thr,
                                                                   np.nan)),
               "resolution_angstrom": res, "status": status, "better_than_angstrom": limit,
               "resolution_1_over_e_angstrom": res, "n_runs": len(aligned), "hands": hands}
    return summary, np.mean(aligned, axis=0)
