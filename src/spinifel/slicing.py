"""Slicing: model images of the current autocorrelation at rotated detector positions.

A model image for orientation ``q`` is the type-2 NUFFT of the autocorrelation (real,
``(M, M, M)``) evaluated at the rotated reciprocal pixel positions ``R(q) @ s_p``, i.e.
the 3D intensity on that orientation's Ewald sphere (docs/architecture.md).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from spinifel.backend.nufft import Type2
from spinifel.geometry.orientations import quaternion_to_matrix


def rotated_points(quaternions: np.ndarray, positions: np.ndarray, reciprocal_extent: float,
                   dtype=np.float64) -> np.ndarray:
    """NUFFT points of the pixels rotated by each orientation.

    Parameters
    ----------
    quaternions : ndarray, shape (B, 4)
        Orientations ``[w, x, y, z]``.
    positions : ndarray, shape (3, P)
        Reciprocal pixel positions, inverse metres.
    reciprocal_extent : float
        Largest ``|s|`` of the detector, inverse metres; maps to ``pi``.

    Returns
    -------
    ndarray, shape (3, B * P)
        ``pi * R(q_b) @ s_p / reciprocal_extent``, orientation-major (all pixels of
        orientation 0 first), in ``dtype``.
    """
    rot = quaternion_to_matrix(np.asarray(quaternions).reshape(-1, 4))  # (B, 3, 3)
    dtype = np.dtype(dtype)
    scaled = ((np.pi / reciprocal_extent) * np.asarray(positions, dtype=np.float64)).astype(dtype)
    rot = rot.astype(dtype)
    pts = np.empty((3, rot.shape[0], scaled.shape[1]), dtype=dtype)
    # Written straight into contiguous rows (finufft wants x, y and z as separate contiguous
    # arrays: no transposed copy). Elementwise products rather than a GEMM: every value is
    # then the same whatever batch it is computed in, so slices do not depend on batching
    # (replicated and ring-distributed matching stay identical).
    tmp = np.empty(pts.shape[1:], dtype=dtype)
    for i in range(3):
        np.multiply(rot[:, i, 0, None], scaled[0], out=pts[i])
        for j in (1, 2):
            np.multiply(rot[:, i, j, None], scaled[j], out=tmp)
            pts[i] += tmp
    # |R s| = |s| <= extent, so points are within [-pi, pi] up to round-off, which finufft
    # accepts (its domain is [-3 pi, 3 pi]).
    return pts.reshape(3, -1)


class Slicer:
    """Model slices of one autocorrelation for batches of orientations.

    The NUFFT plan is created once and reused for every batch (only the points change).

    Parameters
    ----------
    autocorrelation : ndarray, shape (M, M, M), real
    positions : ndarray, shape (3, P)
        Reciprocal positions of the pixels to model (usually only the good pixels),
        inverse metres.
    reciprocal_extent : float
        Inverse metres.
    eps : float
        NUFFT relative tolerance.
    dtype : numpy dtype
        float32 (default) or float64: the precision of the slices.
    nthreads : int
        Threads for finufft.
    """

    def __init__(self, autocorrelation: np.ndarray, positions: np.ndarray, reciprocal_extent: float,
                 eps: float = 1e-4, dtype=np.float32, nthreads: int = 1):
        ac = np.asarray(autocorrelation)
        if ac.ndim != 3 or len(set(ac.shape)) != 1 or ac.shape[0] % 2 == 0:
            raise ValueError(f"autocorrelation must be (M, M, M) with M odd, got {ac.shape}")
        self.dtype = np.dtype(dtype)
        self.positions = np.asarray(positions, dtype=np.float64)
        self.reciprocal_extent = float(reciprocal_extent)
        self._plan = Type2(ac.shape, eps, self.dtype, nthreads)
        self._modes = np.ascontiguousarray(ac, dtype=self._plan.complex_dtype)
        self.n_pixels = self.positions.shape[1]

    def slices(self, quaternions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Model images for ``quaternions`` (B, 4): ndarray ``(B, P)`` of the slicer's dtype."""
        q = np.asarray(quaternions).reshape(-1, 4)
        self._plan.setpts(rotated_points(q, self.positions, self.reciprocal_extent, self.dtype))
        vals = self._plan.execute(self._modes)
        res = vals.real.reshape(q.shape[0], self.n_pixels)
        if out is not None:
            out[...] = res
            return out
        return np.ascontiguousarray(res)

    def iter_batches(self, quaternions: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, slices)`` for consecutive batches of at most ``batch`` orientations."""
        n = len(quaternions)
        for start in range(0, n, batch):
            yield start, self.slices(quaternions[start:start + batch])
