"""Detector pixel positions rotated into the model's NUFFT coordinates.

Shared by slicing (type-2 NUFFT at these points) and merging (type-1 NUFFT from them),
so neither stage imports the other.
"""

from __future__ import annotations

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module
from spinifel.geometry.orientations import quaternion_to_matrix


def rotated_points(quaternions: np.ndarray, positions: np.ndarray, reciprocal_extent: float,
                   dtype=np.float64) -> np.ndarray:
    """NUFFT points of the pixels rotated by each orientation.

    Parameters
    ----------
    quaternions : ndarray, shape (B, 4)
        Orientations ``[w, x, y, z]``.
    positions : array, shape (3, P)
        Reciprocal pixel positions, inverse metres (numpy or cupy: the result follows).
    reciprocal_extent : float
        Largest ``|s|`` of the detector, inverse metres; maps to ``pi``.

    Returns
    -------
    array, shape (3, B * P)
        ``pi * R(q_b) @ s_p / reciprocal_extent``, orientation-major (all pixels of
        orientation 0 first), in ``dtype``, on the array module of ``positions``.
    """
    xp = get_array_module(positions)
    # the B rotation matrices are small: built on the host, copied once per batch
    rot = quaternion_to_matrix(np.asarray(to_module(quaternions, np)).reshape(-1, 4))  # (B, 3, 3)
    dtype = np.dtype(dtype)
    scaled = ((np.pi / reciprocal_extent) * xp.asarray(positions, dtype=np.float64)).astype(dtype)
    rot = to_module(rot.astype(dtype), xp)
    pts = xp.empty((3, rot.shape[0], scaled.shape[1]), dtype=dtype)
    # Written straight into contiguous rows (finufft wants x, y and z as separate contiguous
    # arrays: no transposed copy). Elementwise products rather than a GEMM: every value is
    # then the same whatever batch it is computed in, so slices do not depend on batching
    # (replicated and ring-distributed matching stay identical).
    tmp = xp.empty(pts.shape[1:], dtype=dtype)
    for i in range(3):
        xp.multiply(rot[:, i, 0, None], scaled[0], out=pts[i])
        for j in (1, 2):
            xp.multiply(rot[:, i, j, None], scaled[j], out=tmp)
            pts[i] += tmp
    # |R s| = |s| <= extent, so points are within [-pi, pi] up to round-off, which finufft
    # accepts (its domain is [-3 pi, 3 pi]).
    return pts.reshape(3, -1)
