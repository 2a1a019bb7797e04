"""Phase retrieval transfer function (PRTF) of repeated, independent phasings.

For K densities ``rho_j`` phased from the same merged intensity from different random
starts and aligned onto one another, the PRTF at a reciprocal voxel ``k`` is

    PRTF(k) = | mean_j F_j(k) | / mean_j | F_j(k) |,

the length of the mean unit phasor weighted by amplitude: 1 where all runs agree on the
phase, about ``1 / sqrt(K)`` where the phases are random. Its shell average against
resolution shows down to which resolution the phases are reproducible; the customary
cut-off is ``1 / e`` (Chapman et al., J. Opt. Soc. Am. A 23, 1179 (2006)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spinifel.evaluate.align import align_density
from spinifel.evaluate.fsc import resolution_at, shell_index, to_host

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


def prtf_summary(densities: Sequence[Any], voxel_size_angstrom: float,
                 fourier_mask: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Align K phasing runs, compute the PRTF and the average density.

    Returns
    -------
    summary : dict
        ``freq_inv_angstrom``, ``prtf`` (lists per shell), ``resolution_1_over_e_angstrom``
        (first drop below ``1/e``; the finest shell's resolution when never crossed),
        ``n_runs``, ``hands`` (relative to run 0).
    average : ndarray, shape (M, M, M), float64
        Mean of the aligned densities (>= 0 as each is).
    """
    aligned, hands = align_runs(densities)
    freq, curve = prtf_curve(aligned, voxel_size_angstrom, fourier_mask)
    summary = {"freq_inv_angstrom": [float(x) for x in freq],
               "prtf": [None if not np.isfinite(x) else float(x) for x in curve],
               "resolution_1_over_e_angstrom": resolution_at(freq, curve, PRTF_THRESHOLD),
               "n_runs": len(aligned), "hands": hands}
    return summary, np.mean(aligned, axis=0)
