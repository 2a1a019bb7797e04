"""Slicing (type 2), its adjoint (type 1) and the Toeplitz normal operator vs direct sums."""

import numpy as np
import pytest

from spinifel.backend.nufft import Type1, Type2
from spinifel.geometry.orientations import random_quaternions
from spinifel.geometry.points import rotated_points
from spinifel.merging.merge import ball_support
from spinifel.merging.operator import ToeplitzNormalOperator, adjoint_to_grid, kernel_spectrum
from spinifel.orientation.slicing import Slicer


def _modes(M):
    k = np.arange(M) - (M - 1) // 2
    return np.stack(np.meshgrid(k, k, k, indexing="ij"), 0).reshape(3, -1)


def _direct_matrix(points, M):
    """Dense A with A[p, l] = exp(+i k_l . x_p)."""
    return np.exp(1j * (points.T @ _modes(M)))


def test_type2_matches_direct_sum(rng):
    M = 7
    ac = rng.standard_normal((M, M, M))
    pts = rng.uniform(-np.pi, np.pi, (3, 50))
    for dtype, eps in ((np.float64, 1e-12), (np.float32, 1e-5)):
        p = Type2((M, M, M), eps, dtype)
        p.setpts(pts)
        got = p.execute(ac)
        ref = _direct_matrix(pts, M) @ ac.ravel()
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 10 * max(eps, np.finfo(dtype).eps * 10)


def test_type1_is_adjoint_of_type2(rng):
    """Dot-product test <A x, y> == <x, A* y>."""
    M = 9
    pts = rng.uniform(-np.pi, np.pi, (3, 300))
    x = rng.standard_normal((M, M, M)) + 1j * rng.standard_normal((M, M, M))
    y = rng.standard_normal(300) + 1j * rng.standard_normal(300)
    eps = 1e-12
    t2 = Type2((M, M, M), eps, np.float64)
    t2.setpts(pts)
    t1 = Type1((M, M, M), eps, np.float64)
    t1.setpts(pts)
    lhs = np.vdot(y, t2.execute(x))
    rhs = np.vdot(t1.execute(y), x)
    assert abs(lhs - rhs) / abs(lhs) < 100 * eps


def test_slicer_matches_direct_rotated_sum(rng):
    M = 9
    ac = rng.standard_normal((M, M, M))
    ac = ac + ac[::-1, ::-1, ::-1]  # autocorrelations are centrosymmetric: slices are real
    s = rng.uniform(-1, 1, (3, 40)) * 1e9  # inverse metres
    extent = np.abs(s).max() * np.sqrt(3)
    q = random_quaternions(3, rng)
    sl = Slicer(ac, s, extent, eps=1e-12, dtype=np.float64)
    got = sl.slices(q)
    from spinifel.geometry.orientations import quaternion_to_matrix

    for b in range(3):
        pts = np.pi * quaternion_to_matrix(q[b]) @ s / extent
        ref = (_direct_matrix(pts, M) @ ac.ravel())
        assert np.abs(ref.imag).max() < 1e-9 * np.abs(ref).max()
        assert np.allclose(got[b], ref.real, rtol=0, atol=1e-10 * np.abs(ref).max())
    # batches give the same as one call
    parts = np.concatenate([x for _, x in sl.iter_batches(q, 2)])
    assert np.array_equal(parts, got)


def test_rotated_points_scale_and_shape(rng):
    s = rng.standard_normal((3, 5))
    q = np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    pts = rotated_points(q, s, 10.0)
    assert pts.shape == (3, 10)
    assert np.allclose(pts[:, :5], np.pi * s / 10)
    # 180 degrees about z flips x and y
    assert np.allclose(pts[:, 5:], np.pi * s / 10 * np.array([[-1], [-1], [1]]))


@pytest.mark.parametrize("with_support", [False, True])
def test_toeplitz_equals_direct_normal_operator(rng, with_support):
    M = 7
    npts = 400
    pts = rng.uniform(-np.pi, np.pi, (3, npts))
    w = rng.uniform(0.5, 2.0, npts)
    A = _direct_matrix(pts, M)
    x = rng.standard_normal((M, M, M))
    support = ball_support(M, 0.8) if with_support else None
    xs = np.where(support, x, 0) if with_support else x
    ref = np.real(A.conj().T @ (w * (A @ xs.ravel()))).reshape(M, M, M)
    lam = 0.7
    ref = ref + lam * xs
    if with_support:
        ref[~support] = 0
    kern = adjoint_to_grid(pts, w, 2 * M, 1e-12)
    op = ToeplitzNormalOperator(kernel_spectrum(kern), support)
    got = op(x, lam)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-10
    # the kernel's centre is the sum of the weights (every diagonal entry of A*DA)
    assert kern[M, M, M].real == pytest.approx(w.sum(), rel=1e-12)


def test_rhs_is_adjoint_of_data(rng):
    M = 7
    pts = rng.uniform(-np.pi, np.pi, (3, 100))
    b = rng.standard_normal(100)
    got = adjoint_to_grid(pts, b, M, 1e-12)
    ref = (_direct_matrix(pts, M).conj().T @ b).reshape(M, M, M)
    assert np.abs(got - ref).max() < 1e-10 * np.abs(ref).max()
