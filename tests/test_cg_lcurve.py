"""Tests of spinifel.merging.cg (conjugate gradient) and spinifel.merging.lcurve.

CG is checked against numpy.linalg.solve with the error bound ``cond(A) * tol`` implied by
the stopping rule; the L-curve corner against a dense finite-difference curvature of an
analytic Tikhonov L-curve and against curves with known curvature (circle, kink).
"""

from __future__ import annotations

import numpy as np
import pytest

from spinifel.merging.cg import CGResult, conjugate_gradient, multishift_cg
from spinifel.merging.lcurve import lcurve_corner, lcurve_curvature

EPS64 = np.finfo(np.float64).eps


def _spd(n: int, eigenvalues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


# ----------------------------------------------------------------------------------------
# conjugate gradient
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [10.0, 1e3])
def test_cg_matches_dense_solve(cond):
    rng = np.random.default_rng(101)
    n = 40
    a = _spd(n, np.geomspace(1.0, cond, n), rng)
    b = rng.normal(size=n)
    tol = 1e-10
    res = conjugate_gradient(lambda v: a @ v, b, None, max_iter=10 * n, tol=tol)
    assert isinstance(res, CGResult) and res.converged
    exact = np.linalg.solve(a, b)
    # ||x - x*|| <= ||A^-1|| ||r|| <= cond * tol * ||x*||; the recurrence residual drifts
    # from the true one by O(eps * cond), covered by the factor 2
    rel = np.linalg.norm(res.x - exact) / np.linalg.norm(exact)
    assert rel <= 2 * cond * tol
    assert np.linalg.norm(b - a @ res.x) <= 2 * tol * np.linalg.norm(b)
    assert len(res.residual_norms) == res.n_iter + 1
    assert res.residual_norms[0] == pytest.approx(np.linalg.norm(b), rel=10 * EPS64)
    assert res.residual_norms[-1] <= tol * np.linalg.norm(b)


def test_cg_iteration_count_bounded_by_dimension_and_distinct_eigenvalues():
    rng = np.random.default_rng(102)
    n = 12
    # well conditioned, so rounding does not delay the exact-arithmetic termination at n
    a = _spd(n, np.geomspace(1.0, 10.0, n), rng)
    b = rng.normal(size=n)
    res = conjugate_gradient(lambda v: a @ v, b, None, max_iter=10 * n, tol=1e-10)
    assert res.converged and res.n_iter <= n
    # exact-arithmetic CG ends after as many iterations as A has distinct eigenvalues
    a5 = _spd(n, np.repeat([1.0, 2.0, 3.0, 5.0, 8.0], [3, 3, 2, 2, 2]), rng)
    res5 = conjugate_gradient(lambda v: a5 @ v, b, None, max_iter=10 * n, tol=1e-10)
    assert res5.converged and res5.n_iter <= 5


def test_cg_warm_start_at_solution_needs_no_iteration():
    rng = np.random.default_rng(103)
    n = 30
    a = _spd(n, np.geomspace(1.0, 100.0, n), rng)
    b = rng.normal(size=n)
    exact = np.linalg.solve(a, b)
    res = conjugate_gradient(lambda v: a @ v, b, exact, max_iter=100, tol=1e-8)
    assert res.converged and res.n_iter == 0
    np.testing.assert_array_equal(res.x, exact)
    assert res.x is not exact  # the caller's warm start is not modified in place


def test_cg_on_grid_arrays_with_support_restriction_and_float32():
    # the pipeline's vectors are real M^3 arrays; the operator restricts to a support
    rng = np.random.default_rng(104)
    m = 5
    support = rng.random((m, m, m)) < 0.6
    diag = rng.uniform(1.0, 4.0, size=(m, m, m))

    def apply_a(v):
        return np.where(support, diag * v, 0) + np.where(support, 0, v)

    b = (rng.normal(size=(m, m, m)) * support).astype(np.float32)
    res = conjugate_gradient(apply_a, b, np.zeros_like(b), max_iter=50, tol=1e-5)
    assert res.converged and res.x.dtype == np.float32 and res.x.shape == (m, m, m)
    expected = np.where(support, b / diag, 0)
    eps32 = np.finfo(np.float32).eps
    # ||x - x*|| <= cond * tol * ||x*|| with cond(A) <= 4, plus float32 round-off
    atol = 4 * 1e-5 * np.linalg.norm(expected) + 100 * eps32
    np.testing.assert_allclose(res.x, expected, rtol=0, atol=atol)


def test_cg_custom_inner_product():
    # A = W^-1 K is self-adjoint and positive definite in the inner product <u, v>_W
    rng = np.random.default_rng(105)
    n = 20
    k = _spd(n, np.geomspace(1.0, 20.0, n), rng)
    w = rng.uniform(0.5, 2.0, size=n)
    b = rng.normal(size=n)

    def dot(u, v):
        return float(np.sum(w * u * v))

    res = conjugate_gradient(lambda v: (k @ v) / w, b, None, max_iter=200, tol=1e-12, dot=dot)
    assert res.converged
    exact = np.linalg.solve(k / w[:, None], b)
    np.testing.assert_allclose(res.x, exact, rtol=0, atol=1e3 * 1e-12 * np.abs(exact).max())


def test_cg_zero_rhs_and_breakdown_and_max_iter():
    a = np.diag([1.0, 2.0, 3.0])
    zero = conjugate_gradient(lambda v: a @ v, np.zeros(3), np.ones(3), max_iter=10, tol=1e-8)
    assert zero.converged and zero.n_iter == 0
    np.testing.assert_array_equal(zero.x, np.zeros(3))

    indefinite = np.diag([1.0, -1.0])
    broken = conjugate_gradient(lambda v: indefinite @ v, np.array([1.0, 1.0]), None,
                                max_iter=10, tol=1e-8)
    assert not broken.converged and broken.n_iter == 0

    rng = np.random.default_rng(106)
    a = _spd(30, np.geomspace(1.0, 1e4, 30), rng)
    capped = conjugate_gradient(lambda v: a @ v, rng.normal(size=30), None, max_iter=3, tol=1e-12)
    assert not capped.converged and capped.n_iter == 3 and len(capped.residual_norms) == 4

    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(lambda v: v, np.ones(2), None, max_iter=-1, tol=1e-3)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, np.ones(2), None, max_iter=1, tol=float("nan"))
    with pytest.raises(ValueError, match="x0 must have the shape"):
        conjugate_gradient(lambda v: v, np.ones(2), np.ones(3), max_iter=1, tol=1e-3)


def test_multishift_cg_matches_direct_solves_per_shift():
    """Multi-shift CG (shared Krylov space) must give each shifted system's own solution.

    Catches a wrong zeta/alpha/beta recurrence (each shift would converge to a wrong x
    while the base system, which is plain CG, stays right).
    """
    rng = np.random.default_rng(107)
    n = 50
    a = _spd(n, np.geomspace(1e-3, 1.0, n), rng)
    b = rng.normal(size=n)
    shifts = [1e-2, 1e-3, 1.0, 3e-4, 0.1]  # unsorted on purpose
    tol = 1e-12
    res = multishift_cg(lambda v: a @ v, b, shifts, max_iter=10 * n, tol=tol)
    assert res.converged
    for s, x, rn in zip(shifts, res.xs, res.residual_norms):
        exact = np.linalg.solve(a + s * np.eye(n), b)
        cond = (1.0 + s) / (1e-3 + s)
        rel = np.linalg.norm(x - exact) / np.linalg.norm(exact)
        assert rel <= 10 * cond * tol
        true_res = np.linalg.norm(b - (a + s * np.eye(n)) @ x)
        assert true_res <= 10 * tol * np.linalg.norm(b)
        # the reported residual (zeta_k * ||r||) is the true one up to recurrence drift
        assert rn == pytest.approx(true_res, rel=0.5, abs=100 * EPS64 * np.linalg.norm(b))
    # one Krylov space: no more iterations than plain CG on the hardest (smallest) shift
    s0 = min(shifts)
    base = conjugate_gradient(lambda v: a @ v + s0 * v, b, None, max_iter=10 * n, tol=tol)
    assert res.n_iter <= base.n_iter + 1


def test_multishift_cg_degenerate_inputs():
    """Zero right-hand side, iteration cap and argument checks of multi-shift CG."""
    a = np.diag([1.0, 2.0, 3.0])
    zero = multishift_cg(lambda v: a @ v, np.zeros(3), [0.0, 1.0], max_iter=5, tol=1e-8)
    assert zero.converged and zero.n_iter == 0 and all(not x.any() for x in zero.xs)
    rng = np.random.default_rng(108)
    big = _spd(30, np.geomspace(1.0, 1e4, 30), rng)
    capped = multishift_cg(lambda v: big @ v, rng.normal(size=30), [0.0, 1.0], max_iter=3,
                           tol=1e-12)
    assert not capped.converged and capped.n_iter == 3
    with pytest.raises(ValueError, match="at least one shift"):
        multishift_cg(lambda v: v, np.ones(2), [], max_iter=1, tol=1e-3)
    with pytest.raises(ValueError, match="tol"):
        multishift_cg(lambda v: v, np.ones(2), [0.0], max_iter=1, tol=-1.0)


# ----------------------------------------------------------------------------------------
# L-curve
# ----------------------------------------------------------------------------------------


def _tikhonov_norms(lams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual and solution norms of min ||A x - b||^2 + lam ||x||^2, via the SVD of A."""
    rng = np.random.default_rng(201)
    n = 20
    s = 10.0 ** (-4.0 * np.arange(n) / (n - 1))  # singular values 1 .. 1e-4
    beta = s * np.exp(-0.2 * np.arange(n)) + 1e-3 * rng.normal(size=n)  # U^T b: signal + noise
    f = s**2 / (s**2 + lams[:, None])  # filter factors
    residual = np.sqrt(np.sum(((1 - f) * beta) ** 2, axis=1))
    solution = np.sqrt(np.sum((f * beta / s) ** 2, axis=1))
    return residual, solution


def test_corner_of_tikhonov_lcurve_matches_dense_curvature():
    # reference: curvature by finite differences on a dense grid of log lambda
    t = np.linspace(np.log(1e-12), np.log(1e2), 20001)
    res, sol = _tikhonov_norms(np.exp(t))
    x, y = np.log(res), np.log(sol)
    dx, dy = np.gradient(x, t), np.gradient(y, t)
    ddx, ddy = np.gradient(dx, t), np.gradient(dy, t)
    kappa = (dx * ddy - dy * ddx) / (dx**2 + dy**2) ** 1.5
    t_star = t[10 + np.argmax(kappa[10:-10])]

    rng = np.random.default_rng(202)
    for n_points in (15, 40):
        lams = np.geomspace(1e-12, 1e2, n_points)
        step = np.log(lams[1] / lams[0])
        perm = rng.permutation(n_points)  # the sweep comes unsorted
        r, s = _tikhonov_norms(lams[perm])
        corner = lcurve_corner(r, s, lams[perm])
        assert abs(np.log(lams[perm][corner]) - t_star) <= step
        # permutation invariance of the curvature
        sorted_kappa = lcurve_curvature(*_tikhonov_norms(lams), lams)
        np.testing.assert_array_equal(lcurve_curvature(r, s, lams[perm]), sorted_kappa[perm])
        assert perm[corner] == lcurve_corner(*_tikhonov_norms(lams), lams)


def test_curvature_of_circle_is_inverse_radius():
    # points on a circle in (log residual, log solution), non-uniform angles
    radius = 2.5
    rng = np.random.default_rng(203)
    theta = np.sort(rng.uniform(0.0, np.pi, 12))
    res, sol = np.exp(radius * np.cos(theta)), np.exp(radius * np.sin(theta))
    lams = np.exp(rng.normal(size=12)).cumsum()  # increasing with theta: counter-clockwise
    kappa = lcurve_curvature(res, sol, lams)
    assert np.isnan(kappa[0]) and np.isnan(kappa[-1])
    np.testing.assert_allclose(kappa[1:-1], 1.0 / radius, rtol=1e4 * EPS64)
    # traversed the other way the curve bends right: negative curvature
    np.testing.assert_allclose(lcurve_curvature(res, sol, lams[::-1])[1:-1], -1.0 / radius,
                               rtol=1e4 * EPS64)


def test_corner_of_sharp_kink():
    # vertical branch down to (0, 0) then horizontal branch: the corner is the kink
    x = np.array([0, 0, 0, 0, 0, 1, 2, 3], dtype=float)
    y = np.array([4, 3, 2, 1, 0, 0, 0, 0], dtype=float)
    lams = np.geomspace(1e-6, 1.0, 8)
    kappa = lcurve_curvature(np.exp(x), np.exp(y), lams)
    np.testing.assert_allclose(kappa[[1, 2, 3, 5, 6]], 0.0, atol=10 * EPS64)
    # right-angle turn with unit sides: 2 * 1 / (1 * 1 * sqrt(2))
    assert kappa[4] == pytest.approx(np.sqrt(2.0), rel=10 * EPS64)
    assert lcurve_corner(np.exp(x), np.exp(y), lams) == 4


def test_lcurve_degenerate_inputs():
    x = np.array([0, 0, 0, 0, 0, 1, 2, 3], dtype=float)
    y = np.array([4, 3, 2, 1, 0, 0, 0, 0], dtype=float)
    lams = np.geomspace(1e-6, 1.0, 8)
    res, sol = np.exp(x), np.exp(y)
    # invalid points (NaN, zero, negative lambda) are dropped, not fatal
    bad_res = res.copy()
    bad_res[1] = np.nan
    bad_sol = sol.copy()
    bad_sol[6] = 0.0
    bad_lams = lams.copy()
    bad_lams[7] = -1.0
    assert lcurve_corner(bad_res, bad_sol, bad_lams) == 4
    assert np.isnan(lcurve_curvature(bad_res, bad_sol, bad_lams)[[1, 6, 7]]).all()

    # straight line: no curvature, fallback to the point closest to the normalised origin
    t = np.linspace(0.0, 1.0, 7)
    assert lcurve_corner(np.exp(t), np.exp(1 - t), np.geomspace(1e-3, 1e3, 7)) == 3
    # flat curve (all points equal): every fallback distance ties, the smallest lambda wins
    assert lcurve_corner(np.ones(5), np.ones(5), np.array([3.0, 1.0, 4.0, 1.5, 9.0])) == 1
    # fewer than three points
    assert lcurve_corner([1.0], [2.0], [0.1]) == 0
    assert lcurve_corner([1.0, 2.0], [2.0, 1.0], [0.1, 1.0]) == 0
    assert np.isnan(lcurve_curvature([1.0, 2.0], [2.0, 1.0], [0.1, 1.0])).all()
    # no valid point at all: the middle of the sweep sorted by lambda
    assert lcurve_corner(np.zeros(5), np.zeros(5), np.array([5.0, 1.0, 3.0, 2.0, 4.0])) == 2
    # all lambdas NaN: argsort keeps the input order, the middle of three is index 1
    assert lcurve_corner([np.nan] * 3, [np.nan] * 3, [np.nan] * 3) == 1

    with pytest.raises(ValueError, match="one length"):
        lcurve_corner([1.0, 2.0], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        lcurve_corner([], [], [])
    with pytest.raises(ValueError, match="1-D"):
        lcurve_curvature(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)))
