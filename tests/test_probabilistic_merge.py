"""Probabilistic merge: the hard merge as its one-hot limit, an independent per-pair reference, ranks."""

import numpy as np
import pytest

from spinifel.geometry.orientations import orientation_grid
from spinifel.merging.merge import accumulate_normal_equations, add_normal_equations
from spinifel.merging.probabilistic import accumulate_posterior_normal_equations
from spinifel.orientation.likelihood import Posterior
from spinifel.parallel.context import SerialComm
from spinifel.parallel.partition import block_range

M = 11


def _problem(seed=0, n=23, J=40, n1=9, k=4):
    """Random images on a curved detector, a grid and a random sparse posterior."""
    rng = np.random.default_rng(seed)
    g = np.linspace(-1, 1, n1)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    s = np.stack([gx.ravel(), gy.ravel(), 0.15 * (gx.ravel() ** 2 + gy.ravel() ** 2)]) * 1e9
    extent = float(np.linalg.norm(s, axis=0).max())
    images = rng.poisson(2.0, (n, s.shape[1])).astype(np.float32)
    grid = orientation_grid(J)
    n_kept = rng.integers(1, k + 1, n)
    indices = np.full((n, k), -1, dtype=np.int64)
    weights = np.zeros((n, k))
    for i in range(n):
        indices[i, :n_kept[i]] = rng.choice(J, n_kept[i], replace=False)
        w = rng.uniform(0.1, 1, n_kept[i])
        weights[i, :n_kept[i]] = np.sort(w / w.sum())[::-1]
    fluence = rng.uniform(0.5, 2.0, n)
    fluence[3] = 0.0  # an image without photons contributes nothing
    pix_w = rng.uniform(0.5, 1.5, s.shape[1])
    return images, s, extent, grid, _posterior(indices, weights, n_kept, fluence), pix_w


def _posterior(indices, weights, n_kept, fluence):
    n = len(n_kept)
    z = np.zeros(n)
    return Posterior(indices=indices, weights=weights, n_kept=n_kept, log_likelihood=z, entropy=z,
                     dropped_mass=z, expected_slice_sum=z, fluence=fluence,
                     n_orientations=int(indices.max()) + 1, mean_slice_sum=1.0, beta=1.0)


def _one_hot(posterior):
    n = len(posterior.n_kept)
    return _posterior(posterior.indices[:, :1].copy(), np.ones((n, 1)), np.ones(n, dtype=np.int64),
                      np.ones(n))


def _roundoff_tol(n_terms):
    """Relative tolerance for two summation orders of the same float64 NUFFT strengths.

    A sum of ``n`` terms in another order differs by at most ``(n - 1) eps sum|terms|``;
    the spreading kernel and the deconvolution factors are O(1), and the grids are compared
    relative to their largest entry, which the random positive data keep within a factor of
    about 10 of ``sum|terms|`` per mode: ``10 n eps``.
    """
    return 10 * n_terms * np.finfo(np.float64).eps


def test_one_hot_posterior_equals_hard_merge():
    """Catches any change of values, weights or scalars in the hard-assignment limit.

    Images sharing an orientation are summed before the NUFFT, so the two agree to
    float64 round-off of the summation order, not bitwise.
    """
    images, s, extent, grid, post, pix_w = _problem(J=12)
    hard = _one_hot(post)
    assert len(np.unique(hard.indices[:, 0])) < len(images)  # aggregation does happen
    q = grid[hard.indices[:, 0]]
    ref = accumulate_normal_equations(SerialComm(), images, q, s, extent, M, weights=pix_w,
                                      eps=1e-9, image_batch=5)
    got = accumulate_posterior_normal_equations(SerialComm(), images, hard, grid, s, extent, M,
                                                weights=pix_w, eps=1e-9, image_batch=5)
    tol = _roundoff_tol(len(images) * images.shape[1])
    assert np.abs(got.rhs - ref.rhs).max() <= tol * np.abs(ref.rhs).max()
    assert np.abs(got.spectrum - ref.spectrum).max() <= tol * np.abs(ref.spectrum).max()
    assert got.weight_sum == ref.weight_sum
    assert got.data_norm_sq == pytest.approx(ref.data_norm_sq, rel=tol)


@pytest.mark.parametrize("with_background", [False, True])
def test_equals_duplicated_images_reference(with_background):
    """Catches a wrong weight (P vs P phi) on data or kernel, a lost pair, wrong scalars, a
    wrong per-orientation aggregation, or a background subtracted with the wrong mass.

    Reference: each (image k, orientation j) pair merged alone by the hard merge, with image
    ``(K_k - b) / phi_k`` and pixel weights ``w P_kj phi_k``, and the normal equations summed.
    """
    images, s, extent, grid, post, pix_w = _problem(seed=1)
    kept = post.indices[post.indices >= 0]
    assert len(np.unique(kept)) < len(kept)  # some orientations are shared: aggregation
    bg = np.random.default_rng(9).uniform(0.0, 0.3, s.shape[1]) if with_background else None
    got = accumulate_posterior_normal_equations(SerialComm(), images, post, grid, s, extent, M,
                                                weights=pix_w, eps=1e-9, image_batch=4,
                                                background=bg)
    ref = None
    for i in range(len(images)):
        phi = post.fluence[i]
        if phi == 0:
            continue
        x = images[i:i + 1].astype(np.float64) - (0.0 if bg is None else bg)
        for slot in range(post.n_kept[i]):
            eq = accumulate_normal_equations(
                SerialComm(), x / phi, grid[post.indices[i, slot]][None], s, extent, M,
                weights=pix_w * post.weights[i, slot] * phi, eps=1e-9)
            ref = eq if ref is None else add_normal_equations(ref, eq)
    tol = _roundoff_tol(int(post.n_kept.sum()) * images.shape[1])  # only the order of sums differs
    assert np.abs(got.rhs - ref.rhs).max() <= tol * np.abs(ref.rhs).max()
    assert np.abs(got.spectrum - ref.spectrum).max() <= tol * np.abs(ref.spectrum).max()
    assert got.weight_sum == pytest.approx(ref.weight_sum, rel=tol)
    assert got.data_norm_sq == pytest.approx(ref.data_norm_sq, rel=tol)


@pytest.mark.mpi(min_size=2)
def test_probabilistic_merge_independent_of_rank_count():
    """Catches a missing Allreduce of a grid or scalar, local images indexed globally, or a
    block of the owner-reduced NUFFTs lost, counted twice or given another block's sums or
    background mass (1, 2 and 3 ranks agree to round-off)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    images, s, extent, grid, post, pix_w = _problem(seed=2)
    a, b = block_range(len(images), comm.Get_size(), comm.Get_rank())
    mine = _posterior(post.indices[a:b], post.weights[a:b], post.n_kept[a:b], post.fluence[a:b])
    bg = np.random.default_rng(9).uniform(0.0, 0.05, images.shape[1])
    ref = accumulate_posterior_normal_equations(SerialComm(), images, post, grid, s, extent, M,
                                                weights=pix_w, eps=1e-9, background=bg)
    tol = _roundoff_tol(int(post.n_kept.sum()) * images.shape[1])
    # blocks of 3 active orientations owned round-robin (several rounds, the last partial),
    # and every rank NUFFT-ing its own sums (a per-rank orientation list)
    for batch, shared in ((3, True), (1024, True), (5, False)):
        got = accumulate_posterior_normal_equations(comm, images[a:b], mine, grid, s, extent, M,
                                                    weights=pix_w, eps=1e-9, background=bg,
                                                    image_batch=batch, shared_grid=shared)
        assert np.abs(got.rhs - ref.rhs).max() <= tol * np.abs(ref.rhs).max()
        assert np.abs(got.spectrum - ref.spectrum).max() <= tol * np.abs(ref.spectrum).max()
        assert got.weight_sum == pytest.approx(ref.weight_sum, rel=tol)
        assert got.data_norm_sq == pytest.approx(ref.data_norm_sq, rel=tol)


def test_device_path_matches_host(monkeypatch):
    """Catches host arrays mixed into device arithmetic (score, posterior, merge) on a GPU.

    Runs the whole chain on the numpy-backed CuPy stand-in, which refuses a host operand in
    a device ufunc like CuPy does, and compares with the numpy path.
    """
    import fake_cupy
    from spinifel.orientation.likelihood import score_orientations

    images, s, extent, grid, _, pix_w = _problem(seed=3, J=30)
    rng = np.random.default_rng(3)
    slices = rng.gamma(1.0, 2.0 / 9, (len(grid), images.shape[1])).astype(np.float32)
    kw = {"beta": 0.5, "max_kept": 4, "posterior_mass": 0.99, "image_batch": 7}

    def chain(xp_images, xp_slices, xp_s, fluence):
        batches = [(a, xp_slices[a:a + 8]) for a in range(0, len(grid), 8)]
        post = score_orientations(xp_images, batches, fluence=fluence, **kw)
        eq = accumulate_posterior_normal_equations(SerialComm(), xp_images, post, grid, xp_s,
                                                   extent, M, weights=pix_w, eps=1e-9)
        return post, eq

    host_post, host_eq = chain(images, slices, s, np.ones(len(images)))
    cp = fake_cupy.install(monkeypatch)
    dev_post, dev_eq = chain(cp.asarray(images), cp.asarray(slices), cp.asarray(s),
                             cp.ones(len(images)))
    assert isinstance(dev_post.weights, cp.ndarray) and isinstance(dev_eq.rhs, cp.ndarray)
    assert np.array_equal(dev_post.indices.get(), host_post.indices)
    assert np.allclose(dev_post.weights.get(), host_post.weights, rtol=1e-12)
    assert np.allclose(dev_eq.rhs.get(), host_eq.rhs, rtol=1e-9, atol=1e-9 * np.abs(host_eq.rhs).max())
    assert dev_eq.data_norm_sq == pytest.approx(host_eq.data_norm_sq, rel=1e-12)
