"""Unit quaternions and orientation grids on SO(3).

Convention (used everywhere in spinifel, in datasets written by ``simulate`` and in
``result.h5``): a quaternion is stored as ``[w, x, y, z]`` (scalar first), float64,
and represents the active rotation matrix :func:`quaternion_to_matrix`. An image with
orientation ``q`` samples the molecule's 3D intensity at the rotated reciprocal pixel
positions ``R(q) @ s_pixel``. ``q`` and ``-q`` are the same rotation; grids are
canonicalised to ``w >= 0``.
"""

from __future__ import annotations

import numpy as np

# Super-Fibonacci constants (Alexa, "Super-Fibonacci Spirals: Fast, Low-Discrepancy
# Sampling of SO(3)", CVPR 2022): phi = sqrt(2) and psi, the real root of x^4 = x + 4.
_SF_PHI = np.sqrt(2.0)
_SF_PSI = 1.533751168755204288118041


def normalize(q: np.ndarray) -> np.ndarray:
    """Return unit quaternions ``q / |q|``; shape ``(..., 4)`` is kept."""
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(n == 0):
        raise ValueError("zero-length quaternion cannot be normalised")
    return q / n


def canonical(q: np.ndarray) -> np.ndarray:
    """Map each quaternion to the hemisphere ``w >= 0`` (q and -q are one rotation)."""
    q = np.array(q, dtype=np.float64, copy=True)
    flip = q[..., 0] < 0
    q[flip] *= -1
    return q


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices of unit quaternions.

    Parameters
    ----------
    q : ndarray, shape (..., 4)
        Quaternions ``[w, x, y, z]``; normalised here.

    Returns
    -------
    ndarray, shape (..., 3, 3), float64
        Active rotation matrices ``R`` such that ``R @ v`` rotates column vector ``v``.
    """
    w, x, y, z = np.moveaxis(normalize(q), -1, 0)
    r = np.empty(w.shape + (3, 3))
    r[..., 0, 0] = 1 - 2 * (y * y + z * z)
    r[..., 0, 1] = 2 * (x * y - w * z)
    r[..., 0, 2] = 2 * (x * z + w * y)
    r[..., 1, 0] = 2 * (x * y + w * z)
    r[..., 1, 1] = 1 - 2 * (x * x + z * z)
    r[..., 1, 2] = 2 * (y * z - w * x)
    r[..., 2, 0] = 2 * (x * z - w * y)
    r[..., 2, 1] = 2 * (y * z + w * x)
    r[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return r


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """Quaternions ``[w, x, y, z]`` (canonical, ``w >= 0``) of rotation matrices ``(..., 3, 3)``.

    Uses the eigenvector of the symmetric 4x4 matrix of Bar-Itzhack's method, which is
    stable for every rotation angle and also projects slightly non-orthogonal input.
    """
    r = np.asarray(r, dtype=np.float64)
    m = r
    k = np.empty(r.shape[:-2] + (4, 4))
    k[..., 0, 0] = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    k[..., 0, 1] = m[..., 2, 1] - m[..., 1, 2]
    k[..., 0, 2] = m[..., 0, 2] - m[..., 2, 0]
    k[..., 0, 3] = m[..., 1, 0] - m[..., 0, 1]
    k[..., 1, 1] = m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2]
    k[..., 1, 2] = m[..., 0, 1] + m[..., 1, 0]
    k[..., 1, 3] = m[..., 0, 2] + m[..., 2, 0]
    k[..., 2, 2] = m[..., 1, 1] - m[..., 0, 0] - m[..., 2, 2]
    k[..., 2, 3] = m[..., 1, 2] + m[..., 2, 1]
    k[..., 3, 3] = m[..., 2, 2] - m[..., 0, 0] - m[..., 1, 1]
    for i in range(4):
        for j in range(i):
            k[..., i, j] = k[..., j, i]
    _, vecs = np.linalg.eigh(k / 3.0)
    return canonical(vecs[..., :, -1])


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` (rotation ``b`` first, then ``a``), broadcasting."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def conjugate(q: np.ndarray) -> np.ndarray:
    """Conjugate (inverse rotation for unit quaternions)."""
    q = np.array(q, dtype=np.float64, copy=True)
    q[..., 1:] *= -1
    return q


def angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angle in radians of ``a^-1 b`` (geodesic distance on SO(3)), in [0, pi]."""
    d = np.abs(np.sum(normalize(a) * normalize(b), axis=-1))
    return 2.0 * np.arccos(np.clip(d, 0.0, 1.0))


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations uniformly distributed on SO(3) (Haar measure), canonical, float64.

    Normalised 4D Gaussian vectors are uniform on S^3, hence Haar-uniform on SO(3).
    """
    return canonical(normalize(rng.standard_normal((n, 4))))


def orientation_grid(n: int) -> np.ndarray:
    """Deterministic near-uniform grid of ``n`` rotations (super-Fibonacci spiral).

    Parameters
    ----------
    n : int
        Number of orientations, >= 1.

    Returns
    -------
    ndarray, shape (n, 4), float64
        Canonical unit quaternions. The mean nearest-neighbour rotation angle is about
        :func:`grid_spacing` ``(n)``.
    """
    if n < 1:
        raise ValueError(f"orientation grid needs n >= 1, got {n}")
    s = np.arange(n, dtype=np.float64) + 0.5
    t = s / n
    r = np.sqrt(t)
    big_r = np.sqrt(1.0 - t)
    alpha = 2.0 * np.pi * s / _SF_PHI
    beta = 2.0 * np.pi * s / _SF_PSI
    q = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta),
                  big_r * np.cos(beta)], axis=-1)
    return canonical(q)


def grid_spacing(n: int) -> float:
    """Typical angular spacing in radians of ``n`` near-uniform rotations.

    The edge of a cube of volume ``8 pi^2 / n``, the Haar volume of SO(3) in the
    rotation-angle metric shared equally among ``n`` points.
    """
    return float((8.0 * np.pi**2 / n) ** (1.0 / 3.0))
