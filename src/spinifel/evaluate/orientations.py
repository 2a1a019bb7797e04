"""Global rotation between a reconstruction's frame and the truth frame, and per-image errors.

Convention (docs/architecture.md): image ``i`` samples the intensity at ``R_i @ s``. A
reconstruction lives in an arbitrary frame: ``I_rec(s) = I_true(G s)``. Image ``i`` then
reads ``I_true(R_true_i s) = I_rec(G^T R_true_i s)``, hence ``R_true_i = G R_rec_i`` and
``G`` is the rotation nearest to ``sum_i R_true_i R_rec_i^T`` (SVD projection, the
chordal L2 mean). :func:`spinifel.evaluate.align.rotate_volume` ``(vol_rec, G)`` lands a
reconstructed volume in the truth frame.

Some simulators store the inverse (transposed, "passive") rotation ``T_i = R_true_i^T``.
Then ``T_i^T = G R_rec_i``; :func:`global_rotation` fits both conventions and keeps the
one with the smaller median error. Convention names: ``"direct"`` and ``"transposed"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spinifel.geometry import orientations as quat

CONVENTIONS = ("direct", "transposed")

# Outlier rejection: images whose error exceeds this multiple of the median are left out
# of the refit (but still reported). The floor keeps a perfect fit from rejecting
# images over round-off differences.
_OUTLIER_FACTOR = 3.0
_OUTLIER_FLOOR_DEG = 1e-3
_MAX_REFITS = 20
_N_SEED_CANDIDATES = 32


def as_quaternions(q: object, name: str = "orientations") -> np.ndarray:
    """Return ``q`` as float64 ``(N, 4)``; ``(N, 1, 4)`` is accepted and squeezed."""
    a = np.asarray(q.get() if (not isinstance(q, np.ndarray) and hasattr(q, "get")) else q,
                   dtype=np.float64)
    if a.ndim == 3 and a.shape[1] == 1:
        a = a[:, 0, :]
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) or (N, 1, 4), got {a.shape}")
    return a


def project_to_rotation(m: np.ndarray) -> np.ndarray:
    """Nearest proper rotation (Frobenius norm) to a 3x3 matrix, by SVD with ``det = +1``."""
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    if d == 0:
        d = 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _truth_in_convention(q_true: np.ndarray, convention: str) -> np.ndarray:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return quat.conjugate(q_true) if convention == "transposed" else q_true


def orientation_errors(q_true: object, q_rec: object, g: np.ndarray,
                       convention: str = "direct") -> np.ndarray:
    """Per-image orientation error after the global rotation.

    Parameters
    ----------
    q_true, q_rec : array, shape (N, 4) or (N, 1, 4)
        Ground-truth and reconstructed quaternions ``[w, x, y, z]``, same image order.
    g : ndarray, shape (3, 3)
        Global rotation from :func:`global_rotation`.
    convention : {"direct", "transposed"}
        ``"transposed"`` when ``q_true`` stores the inverse rotations.

    Returns
    -------
    ndarray, shape (N,), float64
        Rotation angle of ``R_true_i^T G R_rec_i`` in degrees, in ``[0, 180]``; ``nan`` for
        images with a non-finite or zero quaternion.
    """
    qt = as_quaternions(q_true, "q_true")
    qr = as_quaternions(q_rec, "q_rec")
    if qt.shape != qr.shape:
        raise ValueError(f"q_true {qt.shape} and q_rec {qr.shape} must have one shape")
    out = np.full(qt.shape[0], np.nan)
    ok = _valid(qt) & _valid(qr)
    if not np.any(ok):
        return out
    qt_c = _truth_in_convention(qt[ok], convention)
    qg = quat.matrix_to_quaternion(np.asarray(g, dtype=np.float64))
    out[ok] = np.degrees(quat.angle_between(qt_c, quat.multiply(qg, qr[ok])))
    return out


def _valid(q: np.ndarray) -> np.ndarray:
    return np.all(np.isfinite(q), axis=1) & (np.linalg.norm(q, axis=1) > 0)


def _fit(rt: np.ndarray, rr: np.ndarray, qt: np.ndarray, qr: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Robust chordal mean of ``R_true_i R_rec_i^T``; returns G, errors, n_inliers, refits."""
    def errors(g: np.ndarray) -> np.ndarray:
        qg = quat.matrix_to_quaternion(g)
        return np.degrees(quat.angle_between(qt, quat.multiply(qg, qr)))

    # Candidates: the mean over all images, and single-image estimates (robust to a
    # majority of wrong orientations, as in early generations); the best median wins.
    pairs = rt @ np.swapaxes(rr, 1, 2)
    n = rt.shape[0]
    cand = [project_to_rotation(pairs.sum(axis=0))]
    for i in np.unique(np.linspace(0, n - 1, min(n, _N_SEED_CANDIDATES)).astype(int)):
        cand.append(project_to_rotation(pairs[i]))
    meds = [np.median(errors(g)) for g in cand]
    g = cand[int(np.argmin(meds))]
    err = errors(g)
    inliers = np.ones(n, dtype=bool)
    refits = 0
    for refits in range(1, _MAX_REFITS + 1):
        new = err <= max(_OUTLIER_FACTOR * np.median(err), _OUTLIER_FLOOR_DEG)
        if refits > 1 and np.array_equal(new, inliers):
            break
        inliers = new
        g = project_to_rotation(pairs[inliers].sum(axis=0))
        err = errors(g)
    return g, err, int(inliers.sum()), refits


def global_rotation(q_true: object, q_rec: object) -> tuple[np.ndarray, dict[str, Any]]:
    """Rotation ``G`` taking the reconstruction's frame to the truth frame.

    Parameters
    ----------
    q_true, q_rec : array, shape (N, 4) or (N, 1, 4)
        Ground-truth and reconstructed quaternions ``[w, x, y, z]`` of the same images in
        the same order (non-finite rows are ignored).

    Returns
    -------
    g : ndarray, shape (3, 3), float64
        Proper rotation with ``R_true_i ~= G R_rec_i`` (in the chosen convention), i.e.
        ``I_rec(s) = I_true(G s)``.
    info : dict
        ``convention`` ("direct" or "transposed"), ``median_error_deg_direct``,
        ``median_error_deg_transposed``, ``n_images`` (valid pairs), ``n_inliers`` (images
        used in the final fit: error <= 3x the median), ``refits``.

    Notes
    -----
    The fit starts from the best (smallest median error) of the all-image chordal mean and
    up to 32 single-image estimates, then iterates: drop images with error above 3x the
    median, refit the chordal mean, until the inlier set is stable.
    """
    qt = as_quaternions(q_true, "q_true")
    qr = as_quaternions(q_rec, "q_rec")
    if qt.shape != qr.shape:
        raise ValueError(f"q_true {qt.shape} and q_rec {qr.shape} must have one shape")
    ok = _valid(qt) & _valid(qr)
    if not np.any(ok):
        raise ValueError("no image has finite, non-zero quaternions in both q_true and q_rec")
    qt, qr = quat.normalize(qt[ok]), quat.normalize(qr[ok])
    rr = quat.quaternion_to_matrix(qr)
    best: tuple | None = None
    info: dict[str, Any] = {"n_images": int(qt.shape[0])}
    for conv in CONVENTIONS:
        qt_c = _truth_in_convention(qt, conv)
        g, err, n_in, refits = _fit(quat.quaternion_to_matrix(qt_c), rr, qt_c, qr)
        med = float(np.median(err))
        info[f"median_error_deg_{conv}"] = med
        if best is None or med < best[0]:
            best = (med, conv, g, n_in, refits)
    _, conv, g, n_in, refits = best
    info.update(convention=conv, n_inliers=n_in, refits=refits)
    return g, info


def error_summary(errors_deg: np.ndarray, grid_spacing_deg: float | None) -> dict[str, Any]:
    """Median, 90th percentile, mean and fraction within one grid spacing (nan-safe).

    ``frac_within_grid_spacing`` is ``None`` when no grid spacing is known.
    """
    e = np.asarray(errors_deg, dtype=np.float64)
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {"median": None, "p90": None, "mean": None, "frac_within_grid_spacing": None,
                "n_images": 0, "grid_spacing_deg": grid_spacing_deg}
    frac = None if grid_spacing_deg is None else float(np.mean(e <= grid_spacing_deg))
    return {"median": float(np.median(e)), "p90": float(np.percentile(e, 90)),
            "mean": float(np.mean(e)), "frac_within_grid_spacing": frac,
            "n_images": int(e.size), "grid_spacing_deg": grid_spacing_deg}
