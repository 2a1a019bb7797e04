"""Slicing: model images of the current autocorrelation at rotated detector positions.

A model image for orientation ``q`` is the type-2 NUFFT of the autocorrelation (real,
``(M, M, M)``) evaluated at the rotated reciprocal pixel positions ``R(q) @ s_p``, i.e.
the 3D intensity on that orientation's Ewald sphere (docs/architecture.md).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module
from spinifel.backend.nufft import Type2
from spinifel.geometry.points import rotated_points


class Slicer:
    """Model slices of one autocorrelation for batches of orientations.

    The NUFFT plan is created once and reused for every batch (only the points change).

    Parameters
    ----------
    autocorrelation : array, shape (M, M, M), real
    positions : array, shape (3, P)
        Reciprocal positions of the pixels to model (usually only the good pixels),
        inverse metres. If either this or ``autocorrelation`` is a cupy array, the slices
        are computed on the GPU (cufinufft) and returned as cupy arrays.
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
        xp = get_array_module(autocorrelation, positions)
        self.xp = xp
        ac = to_module(autocorrelation, xp)
        if ac.ndim != 3 or len(set(ac.shape)) != 1 or ac.shape[0] % 2 == 0:
            raise ValueError(f"autocorrelation must be (M, M, M) with M odd, got {ac.shape}")
        self.dtype = np.dtype(dtype)
        self.positions = to_module(positions, xp, dtype=np.float64)
        self.reciprocal_extent = float(reciprocal_extent)
        self._plan = Type2(ac.shape, eps, self.dtype, nthreads, xp=xp)
        self._modes = xp.ascontiguousarray(ac, dtype=self._plan.complex_dtype)
        self.n_pixels = self.positions.shape[1]

    def slices(self, quaternions: np.ndarray, out=None):
        """Model images for ``quaternions`` (B, 4): array ``(B, P)`` of the slicer's dtype
        and array module."""
        q = np.asarray(to_module(quaternions, np)).reshape(-1, 4)
        self._plan.setpts(rotated_points(q, self.positions, self.reciprocal_extent, self.dtype))
        vals = self._plan.execute(self._modes)
        res = vals.real.reshape(q.shape[0], self.n_pixels)
        if out is not None:
            out[...] = res
            return out
        return self.xp.ascontiguousarray(res)

    def iter_batches(self, quaternions: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, slices)`` for consecutive batches of at most ``batch`` orientations."""
        n = len(quaternions)
        for start in range(0, n, batch):
            yield start, self.slices(quaternions[start:start + batch])
