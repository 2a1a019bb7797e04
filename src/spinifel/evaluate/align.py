"""Bring a reconstruction into the truth frame: rotate, fix the hand and the shift.

Grid convention (docs/architecture.md): index ``l`` along each axis is the position
``(l - (M - 1) / 2) * d``, array axis ``j`` is coordinate ``j``; the centre voxel is the
origin, and the centred reciprocal grid of the intensity follows the same rule.
All work is on the host (numpy/scipy); device arrays are copied first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from spinifel.evaluate.fsc import pearson, shell_index, to_host
from spinifel.geometry import orientations as quat


def _centred_grid(m: int) -> np.ndarray:
    """Offsets from the centre voxel of every voxel, shape (3, m**3), float64."""
    k = np.arange(m, dtype=np.float64) - (m - 1) / 2.0
    g = np.meshgrid(k, k, k, indexing="ij")
    return np.stack([x.ravel() for x in g])


def rotate_volume(vol: object, r: np.ndarray, order: int = 3) -> np.ndarray:
    """Rotate a volume's content about the centre voxel: ``out(x) = vol(R^T x)``.

    A feature at position ``p`` of ``vol`` appears at ``R p`` in ``out``. With ``G`` from
    :func:`spinifel.evaluate.orientations.global_rotation` (``I_rec(s) = I_true(G s)``,
    likewise for the density), ``rotate_volume(rec, G)`` is the reconstruction in the
    truth frame.

    Parameters
    ----------
    vol : array, shape (M, M, M), real
        Density or intensity on the centred grid.
    r : ndarray, shape (3, 3)
        Rotation matrix (active, acting on column vectors of (axis0, axis1, axis2)).
    order : int
        Spline order of :func:`scipy.ndimage.map_coordinates` (3: cubic, 1: linear).

    Returns
    -------
    ndarray, shape (M, M, M), float64
        Values outside the grid are taken as zero.
    """
    v = to_host(vol).astype(np.float64)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"rotate_volume needs a cubic (M, M, M) volume, got shape {v.shape}")
    r = np.asarray(r, dtype=np.float64)
    if r.shape != (3, 3):
        raise ValueError(f"rotation must have shape (3, 3), got {r.shape}")
    m = v.shape[0]
    c = (m - 1) / 2.0
    src = r.T @ _centred_grid(m) + c
    return ndimage.map_coordinates(v, src, order=order, mode="constant", cval=0.0).reshape(v.shape)


def mirror(vol: np.ndarray) -> np.ndarray:
    """Inversion through the centre voxel, ``out(x) = vol(-x)`` (index ``l -> M - 1 - l``)."""
    return np.ascontiguousarray(vol[::-1, ::-1, ::-1])


def _fourier_shift(vol: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``out(x) = vol(x - shift)`` for a sub-voxel shift (periodic)."""
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in vol.shape], indexing="ij", sparse=True)
    phase = sum(f * s for f, s in zip(freqs, shift))
    return np.real(np.fft.ifftn(np.fft.fftn(vol) * np.exp(-2j * np.pi * phase)))


def _best_shift(moving: np.ndarray, ref_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer shift maximising the circular cross-correlation, and a parabolic sub-voxel
    estimate around it. Returns (integer shift, fractional correction), both (3,)."""
    mov = moving - moving.mean()
    cc = np.real(np.fft.ifftn(ref_hat * np.conj(np.fft.fftn(mov))))
    peak = np.array(np.unravel_index(int(np.argmax(cc)), cc.shape))
    n = np.array(cc.shape)
    frac = np.zeros(3)
    for ax in range(3):
        lo, hi = peak.copy(), peak.copy()
        lo[ax] = (lo[ax] - 1) % n[ax]
        hi[ax] = (hi[ax] + 1) % n[ax]
        y0, y1, y2 = cc[tuple(lo)], cc[tuple(peak)], cc[tuple(hi)]
        den = y0 - 2 * y1 + y2
        if den < 0:
            frac[ax] = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5))
    shift = np.where(peak > n // 2, peak - n, peak)  # circular lag -> signed shift
    return shift.astype(np.float64), frac


def align_density(moving: object, reference: object, subvoxel: bool = True
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Align a density to a reference over hand (inversion) and translation, fit the scale.

    Both hands are tried: ``moving`` and its inversion through the centre voxel. For each,
    the integer shift maximising the FFT cross-correlation is applied (circular shift: the
    densities are assumed to be compact inside the grid), optionally refined to sub-voxel
    by a parabolic fit of the correlation peak and a Fourier shift (kept only if it raises
    the correlation). The hand with the higher Pearson correlation wins.

    Parameters
    ----------
    moving, reference : array, shape (M, M, M), real
        Densities in one rotational frame (rotate first with :func:`rotate_volume`).
    subvoxel : bool
        Refine the shift below one voxel.

    Returns
    -------
    aligned : ndarray, shape (M, M, M), float64
        ``scale * H(moving)(x - shift)`` with ``H`` the identity or the inversion and
        ``scale`` the least-squares factor onto ``reference``.
    info : dict
        ``hand`` ("same" or "mirrored"), ``shift`` (list of 3 floats, voxels, applied after
        ``H``), ``correlation`` (Pearson over the whole grid), ``scale``,
        ``correlation_other_hand``.
    """
    mov = to_host(moving).astype(np.float64)
    ref = to_host(reference).astype(np.float64)
    if mov.shape != ref.shape or mov.ndim != 3:
        raise ValueError(f"align_density needs two volumes of one 3D shape, got {mov.shape} "
                         f"and {ref.shape}")
    ref_hat = np.fft.fftn(ref - ref.mean())
    results = []
    for hand, vol in (("same", mov), ("mirrored", mirror(mov))):
        shift, frac = _best_shift(vol, ref_hat)
        out = np.roll(vol, shift.astype(int), axis=(0, 1, 2))
        corr = pearson(out, ref)
        if subvoxel and np.any(frac != 0):
            fine = _fourier_shift(out, frac)
            c_fine = pearson(fine, ref)
            if c_fine > corr:
                out, corr, shift = fine, c_fine, shift + frac
        results.append((corr if np.isfinite(corr) else -np.inf, hand, out, shift))
    results.sort(key=lambda t: t[0], reverse=True)
    corr, hand, out, shift = results[0]
    den = float(np.dot(out.ravel(), out.ravel()))
    scale = float(np.dot(out.ravel(), ref.ravel()) / den) if den > 0 else 1.0
    info = {"hand": hand, "shift": [float(s) for s in shift], "correlation": float(corr),
            "scale": scale, "correlation_other_hand": float(results[1][0])}
    return out * scale, info


# ---------------------------------------------------------------- rotation search ---

# Radii (reciprocal voxels) of the balls used by the coarse and the fine search stages.
# Speckles are about two voxels wide (the density fills at most half the grid), so
# cropping, not subsampling, is the way to make the coarse stage cheap; the coarse
# ball resolves about 2/8 rad, finer than the 17 degree coarse grid.
_COARSE_RADIUS = 8.0
_FINE_RADIUS = 16.0

def _features(intensity: np.ndarray) -> np.ndarray:
    """Log intensity minus its shell mean (the rotation-invariant part).

    Removing the radial profile leaves only the anisotropic signal that tells rotations
    apart; the log balances the decades between low and high resolution, and the floor
    (a tenth of the shell's mean intensity) keeps speckle zeros from dominating.
    """
    v = np.maximum(np.asarray(intensity, dtype=np.float64), 0.0)
    if not float(np.max(v)) > 0:
        raise ValueError("intensity has no positive value; cannot search a rotation")
    shells = shell_index(v.shape[0]).ravel()
    cnt = np.maximum(np.bincount(shells), 1)
    smean = np.bincount(shells, weights=v.ravel()) / cnt
    f = np.log(v.ravel() + 0.1 * smean[shells] + np.finfo(np.float64).tiny)
    f -= (np.bincount(shells, weights=f) / cnt)[shells]
    return f.reshape(v.shape)


def _sample_points(m: int, radius: float) -> np.ndarray:
    """Centred offsets (3, n) of the voxels with ``1 <= |k| <= radius`` (the centre is a
    single, uninformative value)."""
    k = np.arange(m, dtype=np.float64) - (m - 1) / 2.0
    g = np.stack([x.ravel() for x in np.meshgrid(k, k, k, indexing="ij")])
    r = np.sqrt(np.sum(g * g, axis=0))
    return g[:, (r <= radius) & (r >= 1.0)]


def _batch_corr(rec_f: np.ndarray, pts: np.ndarray, target: np.ndarray,
                mats: np.ndarray) -> np.ndarray:
    """Pearson correlation of the target values with rec_f sampled at ``R^T pts`` for each R."""
    c = (rec_f.shape[0] - 1) / 2.0
    src = np.einsum("bji,jn->ibn", mats, pts) + c  # R^T p for every R, (3, b, n)
    vals = ndimage.map_coordinates(rec_f, src.reshape(3, -1), order=1, mode="constant",
                                   cval=0.0).reshape(mats.shape[0], -1)
    vals = vals - vals.mean(axis=1, keepdims=True)
    t = target - target.mean()
    den = np.sqrt(np.sum(vals * vals, axis=1) * np.dot(t, t))
    return np.where(den > 0, vals @ t / np.where(den > 0, den, 1.0), -1.0)


def search_rotation(intensity_moving: object, intensity_reference: object,
                    n_coarse: int = 3000, n_candidates: int = 6
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Rotation ``G`` with ``rotate_volume(intensity_moving, G) ~= intensity_reference``.

    For results without orientations (or a truth without them). Intensities have no hand
    or shift ambiguity (Friedel symmetric, translation invariant), so only a rotation is
    searched. The criterion is the Pearson correlation of the log intensities with their
    radial (shell) means removed, over the ball of the grid.

    Stages: (1) a super-Fibonacci grid of ``n_coarse`` rotations (about 17 degrees apart
    for 3000) scored on the voxels within 8 reciprocal voxels of the centre; (2)
    Nelder-Mead over a rotation vector from the ``n_candidates`` best, on the same ball;
    (3) the best two refined again on the ball of radius 16 (or the whole grid if smaller).

    Parameters
    ----------
    intensity_moving, intensity_reference : array, shape (M, M, M)
        Centred 3D intensities (positive).
    n_coarse : int
        Size of the coarse rotation grid.
    n_candidates : int
        Coarse maxima refined locally.

    Returns
    -------
    g : ndarray, shape (3, 3), float64
        Best rotation.
    info : dict
        ``correlation`` (criterion at ``g`` on the fine lattice), ``coarse_correlation``
        (best grid value), ``n_coarse``, ``n_evaluations``.

    Cost: a few seconds for M = 41 on one core, dominated by linear interpolation.
    """
    mov = to_host(intensity_moving).astype(np.float64)
    ref = to_host(intensity_reference).astype(np.float64)
    if mov.shape != ref.shape or mov.ndim != 3 or len(set(mov.shape)) != 1:
        raise ValueError(f"search_rotation needs two cubic volumes of one shape, got "
                         f"{mov.shape} and {ref.shape}")
    m = mov.shape[0]
    c = (m - 1) / 2.0
    n_eval = 0
    rec_f = _features(mov)
    ref_f = _features(ref)

    def level(radius: float) -> tuple[np.ndarray, np.ndarray]:
        pts = _sample_points(m, min(c, radius))
        return pts, ndimage.map_coordinates(ref_f, pts + c, order=1)

    pts_c, tgt_c = level(_COARSE_RADIUS)
    grid = quat.quaternion_to_matrix(quat.orientation_grid(n_coarse))
    scores = np.concatenate([_batch_corr(rec_f, pts_c, tgt_c, grid[i:i + 256])
                             for i in range(0, n_coarse, 256)])
    n_eval += n_coarse
    order = np.argsort(scores)[::-1][:n_candidates]

    def refine(r0: np.ndarray, rec_f: np.ndarray, pts: np.ndarray, tgt: np.ndarray,
               scale: float) -> tuple[np.ndarray, float, int]:
        def cost(w: np.ndarray) -> float:
            r = Rotation.from_rotvec(w).as_matrix() @ r0
            return -float(_batch_corr(rec_f, pts, tgt, r[None])[0])
        simplex = np.vstack([np.zeros(3), scale * np.eye(3)])
        res = optimize.minimize(cost, np.zeros(3), method="Nelder-Mead",
                                options={"initial_simplex": simplex, "xatol": 1e-3,
                                         "fatol": 1e-7, "maxfev": 400})
        return Rotation.from_rotvec(res.x).as_matrix() @ r0, -float(res.fun), int(res.nfev)

    spacing = quat.grid_spacing(n_coarse)
    stage2 = []
    for i in order:
        r, s, nf = refine(grid[i], rec_f, pts_c, tgt_c, 0.5 * spacing)
        n_eval += nf
        stage2.append((s, r))
    stage2.sort(key=lambda t: t[0], reverse=True)
    pts_f, tgt_f = level(_FINE_RADIUS)
    best = None
    for _, r0 in stage2[:2]:
        r, s, nf = refine(r0, rec_f, pts_f, tgt_f, np.radians(2.0))
        n_eval += nf
        if best is None or s > best[0]:
            best = (s, r)
    s, g = best
    u, _, vt = np.linalg.svd(g)  # re-orthonormalise after the products
    g = u @ vt
    return g, {"correlation": float(s), "coarse_correlation": float(scores[order[0]]),
               "n_coarse": int(n_coarse), "n_evaluations": int(n_eval)}
