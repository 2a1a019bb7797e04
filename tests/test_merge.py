"""The global merge: recovery of a known autocorrelation, and rank-count independence."""

import numpy as np
import pytest

from spinifel.geometry.orientations import random_quaternions
from spinifel.merging.merge import accumulate_normal_equations, ball_support, merge
from spinifel.orientation.slicing import Slicer
from spinifel.parallel.context import SerialComm
from spinifel.parallel.partition import block_range
from spinifel.phasing.algorithms import autocorrelation_from_density


def _problem(seed=0, M=17, n_images=60, n1=14):
    rng = np.random.default_rng(seed)
    idx = np.indices((M, M, M)) - (M - 1) / 2
    rho = np.zeros((M, M, M))
    # blobs near the centre so the autocorrelation fits in the support ball
    for c in rng.uniform(-1.2, 1.2, (4, 3)):
        rho += np.exp(-((idx - c[:, None, None, None]) ** 2).sum(0) / 0.8)
    ac = autocorrelation_from_density(rho)
    g = np.linspace(-1, 1, n1)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    s = np.stack([gx.ravel(), gy.ravel(), 0.15 * (gx.ravel() ** 2 + gy.ravel() ** 2)]) * 1e9
    extent = float(np.linalg.norm(s, axis=0).max())
    q = random_quaternions(n_images, rng)
    images = Slicer(ac, s, extent, eps=1e-12, dtype=np.float64).slices(q)
    return ac, s, extent, q, images


def _merge(comm, images, q, s, extent, M, lambdas, tol=1e-10):
    eq = accumulate_normal_equations(comm, images, q, s, extent, M, eps=1e-12, image_batch=17)
    z = np.zeros((M, M, M))
    return merge(comm, eq, lambdas_rel=lambdas, x0=z, x_init=z, support=ball_support(M),
                 max_iter=300, tol=tol)


def test_merge_reproduces_the_data():
    ac, s, extent, q, images = _problem()
    M = ac.shape[0]
    res = _merge(SerialComm(), images, q, s, extent, M, [1e-8])
    model = Slicer(res.autocorrelation, s, extent, eps=1e-12, dtype=np.float64).slices(q)
    rel = np.linalg.norm(model - images) / np.linalg.norm(images)
    assert rel < 1e-3
    # residual norm reported from the normal equations equals the direct one
    assert res.residual_norms[0] == pytest.approx(np.linalg.norm(model - images), rel=1e-3, abs=1e-6 * np.linalg.norm(images))


def test_lcurve_sweep_orders_norms():
    ac, s, extent, q, images = _problem(seed=1)
    lambdas = [1e-6, 1e-4, 1e-2, 1.0, 100.0]
    res = _merge(SerialComm(), images, q, s, extent, ac.shape[0], lambdas)
    # more regularisation: larger residual, smaller solution (Tikhonov monotonicity)
    assert np.all(np.diff(res.residual_norms) >= -1e-9 * max(res.residual_norms))
    assert np.all(np.diff(res.solution_norms) <= 1e-9 * max(res.solution_norms))
    assert 0 <= res.index < len(lambdas)


@pytest.mark.mpi(min_size=2)
def test_merge_independent_of_rank_count():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    ac, s, extent, q, images = _problem(seed=2)
    M = ac.shape[0]
    lambdas = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    a, b = block_range(len(q), comm.Get_size(), comm.Get_rank())
    eq1 = accumulate_normal_equations(SerialComm(), images, q, s, extent, M, eps=1e-12)
    eq2 = accumulate_normal_equations(comm, images[a:b], q[a:b], s, extent, M, eps=1e-12)
    # The summed normal equations agree to float64 round-off (summation order only).
    tol = 1e-12
    assert np.abs(eq2.rhs - eq1.rhs).max() < tol * np.abs(eq1.rhs).max()
    assert np.abs(eq2.spectrum - eq1.spectrum).max() < tol * np.abs(eq1.spectrum).max()
    assert eq2.weight_sum == pytest.approx(eq1.weight_sum, rel=tol)
    assert eq2.data_norm_sq == pytest.approx(eq1.data_norm_sq, rel=tol)
    ref = _merge(SerialComm(), images, q, s, extent, M, lambdas, tol=1e-10)
    par = _merge(comm, images[a:b], q[a:b], s, extent, M, lambdas, tol=1e-10)
    assert par.index == ref.index
    assert par.lam == pytest.approx(ref.lam, rel=1e-12)
    # CG may stop one iteration apart on the two runs; the solutions then differ by the
    # CG tolerance times the condition number, far below any meaningful change.
    scale = np.abs(ref.autocorrelation).max()
    assert np.abs(par.autocorrelation - ref.autocorrelation).max() < 1e-6 * scale
    # every rank holds the same winner
    allx = comm.allgather(par.autocorrelation)
    assert all(np.array_equal(allx[0], x) for x in allx)
