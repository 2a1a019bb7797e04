"""Orientation matching against a brute-force reference and on exact model slices."""

import numpy as np
import pytest

from helpers import blob_slicer
from spinifel.geometry.orientations import orientation_grid
from spinifel.orientation.matching import match_orientations
from spinifel.orientation.slicing import Slicer
from spinifel.phasing.algorithms import autocorrelation_from_density


def _batches(slices, batch):
    for a in range(0, len(slices), batch):
        yield a, slices[a:a + batch]


def test_matches_brute_force_distances(rng):
    n, B, P = 37, 53, 20
    images = rng.standard_normal((n, P)).astype(np.float32)
    slices = rng.standard_normal((B, P)).astype(np.float32)
    d = ((images[:, None, :].astype(np.float64) - slices[None]) ** 2).sum(-1)
    st = match_orientations(images, _batches(slices, 7), image_batch=10)
    assert np.array_equal(st.best_index, d.argmin(1))
    assert np.allclose(st.best_dist, d.min(1), rtol=1e-5, atol=1e-4)


def test_scale_per_image_brute_force(rng):
    n, B, P = 25, 40, 16
    images = rng.uniform(0, 1, (n, P))
    slices = rng.uniform(0, 1, (B, P))
    # best non-negative scale for each pair, then the distance
    c = np.maximum(images @ slices.T, 0) / (slices**2).sum(1)
    d = ((images[:, None, :] - c[:, :, None] * slices[None]) ** 2).sum(-1)
    st = match_orientations(images, _batches(slices, 9), scale_per_image=True)
    assert np.array_equal(st.best_index, d.argmin(1))
    assert np.allclose(st.best_dist, d.min(1), rtol=1e-10, atol=1e-12)
    assert np.allclose(st.best_scale, c[np.arange(n), d.argmin(1)])


def test_true_orientation_found_for_model_slices(rng):
    M = 15
    x = np.zeros((M, M, M))
    # a few off-centre blobs: an asymmetric object
    idx = np.indices((M, M, M)) - (M - 1) / 2
    for c in ([2, 0, 1], [-3, 2, 0], [0, -2, -3]):
        x += np.exp(-((idx - np.array(c)[:, None, None, None]) ** 2).sum(0) / 2.0)
    ac = autocorrelation_from_density(x)
    n1 = 12
    g = np.linspace(-1, 1, n1)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    s = np.stack([gx.ravel(), gy.ravel(), 0.1 * (gx.ravel() ** 2 + gy.ravel() ** 2)]) * 1e9
    extent = np.linalg.norm(s, axis=0).max()
    grid = orientation_grid(300)
    slicer = Slicer(ac, s, extent, eps=1e-6)
    truth = rng.choice(300, 40, replace=False)
    images = slicer.slices(grid[truth])
    st = match_orientations(images, slicer.iter_batches(grid, 64))
    assert np.array_equal(st.best_index, truth)
    # with a per-image fluence the plain distance fails but the scaled one still matches
    scaled = images * rng.uniform(0.3, 3, (40, 1)).astype(np.float32)
    st2 = match_orientations(scaled, slicer.iter_batches(grid, 64), scale_per_image=True)
    assert np.array_equal(st2.best_index, truth)


@pytest.mark.parametrize("stencil", ["axes", "cube"])
def test_refinement_finds_off_grid_orientation(rng, stencil):
    from spinifel.geometry.orientations import angle_between, grid_spacing, random_quaternions
    from spinifel.orientation.matching import refine_orientations

    slicer = blob_slicer()
    n_grid = 500
    grid = orientation_grid(n_grid)
    truth = random_quaternions(20, rng)  # off the grid
    images = slicer.slices(truth)
    st = match_orientations(images, slicer.iter_batches(grid, 100))
    # A smooth test object hardly tells q from q turned by pi about the beam axis (z): the
    # detector is nearly flat at low q. Measure errors modulo that turn.
    flip = np.array([0.0, 0.0, 0.0, 1.0])
    from spinifel.geometry.orientations import multiply

    def err(q):
        return np.minimum(angle_between(q, truth), angle_between(q, multiply(truth, flip)))

    coarse = err(grid[st.best_index])
    step = 0.5 * grid_spacing(n_grid)
    q, d = refine_orientations(images, grid[st.best_index], slicer, step, n_rounds=4,
                               stencil=stencil)
    fine = err(q)
    print(stencil, "median error", np.median(coarse), "->", np.median(fine))
    # refinement never makes the fit worse and resolves to a fraction of the grid spacing
    assert np.all(d <= st.best_dist * (1 + 1e-9) + 1e-9)
    assert np.median(fine) < 0.25 * np.median(coarse)
    assert np.median(fine) < step / 2


def test_parabolic_offsets_find_the_minimum_of_a_separable_quadratic(rng):
    from spinifel.orientation.matching import _parabolic_offsets

    h = 0.1
    centre = rng.uniform(-h, h, (50, 3))
    curv = rng.uniform(0.5, 3.0, (50, 3))

    def f(v):  # separable convex quadratic per image
        return (curv * (v - centre) ** 2).sum(-1) + 7.0

    pts = [np.zeros(3)] + [s * h * np.eye(3)[i] for i in range(3) for s in (-1, 1)]
    d = np.stack([f(np.broadcast_to(p, (50, 3))) for p in pts], axis=1)
    v = _parabolic_offsets(d, h)
    assert np.allclose(v, centre, atol=1e-12)
    # concave along an axis: move to the better end point
    d2 = d.copy()
    d2[:, 1], d2[:, 2] = 7.0, 7.0 - 1.0  # x: both ends, +h lower than the centre
    d2[:, 0] = 7.5
    assert np.allclose(_parabolic_offsets(d2, h)[:, 0], h)


@pytest.mark.mpi(min_size=2)
def test_matching_independent_of_rank_count():
    """Each rank's block (uneven, image_batch smaller than the block) gathered in rank order
    equals the brute-force float64 best slice and distance of every image.

    Catches a rank's result landing at the wrong images (block offsets), a batch boundary
    dropping or repeating images, and a rank using another scale or slice set. (The old
    test compared two calls of the same function, which cannot disagree.)
    """
    from mpi4py import MPI

    from spinifel.parallel.partition import block_range

    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(7)
    images = rng.uniform(0, 1, (101, 40))
    slices = rng.uniform(0, 1, (230, 40))
    c = np.maximum(images @ slices.T, 0) / (slices**2).sum(1)
    d = ((images[:, None, :] - c[:, :, None] * slices[None]) ** 2).sum(-1)
    a, b = block_range(len(images), comm.Get_size(), comm.Get_rank())
    mine = match_orientations(images[a:b], _batches(slices, 64), scale_per_image=True,
                              image_batch=13)
    every = np.concatenate(comm.allgather(mine.best_index))
    dist = np.concatenate(comm.allgather(mine.best_dist))
    assert np.array_equal(every, d.argmin(1))
    assert np.allclose(dist, d.min(1), rtol=1e-10, atol=1e-12)


def test_sqrt_transform_brute_force(rng):
    images = rng.uniform(0, 4, (30, 12))
    slices = rng.uniform(-0.1, 4, (50, 12))  # negative model values are clipped to 0
    ref = ((np.sqrt(images)[:, None, :] - np.sqrt(np.maximum(slices, 0))[None]) ** 2).sum(-1)
    st = match_orientations(images, _batches(slices, 16), transform="sqrt")
    assert np.array_equal(st.best_index, ref.argmin(1))
    assert np.allclose(st.best_dist, ref.min(1), rtol=1e-10, atol=1e-12)


def test_distributed_equals_replicated_serial(rng):
    from spinifel.orientation.matching import match_distributed
    from spinifel.parallel.context import SerialComm

    M = 15
    idx = np.indices((M, M, M)) - (M - 1) / 2
    x = np.zeros((M, M, M))
    for c in np.random.default_rng(4).uniform(-3, 3, (8, 3)):
        x += np.exp(-((idx - c[:, None, None, None]) ** 2).sum(0) / 0.8)
    ac = autocorrelation_from_density(x)
    g = np.linspace(-1, 1, 10)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    s = np.stack([gx.ravel(), gy.ravel(), 0.3 * (gx.ravel() ** 2 + gy.ravel() ** 2)]) * 1e9
    slicer = Slicer(ac, s, np.linalg.norm(s, axis=0).max(), eps=1e-6)
    grid = orientation_grid(400)
    images = slicer.slices(grid[rng.choice(400, 30)]) * rng.uniform(0.5, 2, (30, 1)).astype(np.float32)
    ref = match_orientations(images, slicer.iter_batches(grid, 64), True, 4096, "sqrt")
    got = match_distributed(SerialComm(), images, slicer, grid, 64, True, 4096, "sqrt")
    assert np.array_equal(ref.best_index, got.best_index)


@pytest.mark.mpi(min_size=2)
def test_distributed_equals_replicated_two_ranks():
    from mpi4py import MPI

    from spinifel.orientation.matching import match_distributed
    from spinifel.parallel.partition import block_range

    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(9)
    M = 15
    x = rng.uniform(0, 1, (M, M, M))
    ac = autocorrelation_from_density(x)
    s = rng.uniform(-1, 1, (3, 60)) * 1e9
    slicer = Slicer(ac, s, np.linalg.norm(s, axis=0).max(), eps=1e-6)
    grid = orientation_grid(333)
    images = np.abs(rng.standard_normal((41, 60))).astype(np.float32) * 1e3
    a, b = block_range(len(images), comm.Get_size(), comm.Get_rank())
    ref = match_orientations(images, slicer.iter_batches(grid, 50), True, 4096, "sqrt")
    got = match_distributed(comm, images[a:b], slicer, grid, 50, True, 4096, "sqrt")
    assert np.array_equal(got.best_index, ref.best_index[a:b])
    assert np.allclose(got.best_dist, ref.best_dist[a:b], rtol=1e-6)
