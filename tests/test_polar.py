"""Polar orientation search (in-plane rotations by FFT) against direct references."""

import numpy as np
import pytest

from spinifel.geometry.detector import flat_detector_positions, photon_energy_to_wavelength
from spinifel.geometry.orientations import (
    angle_between,
    quaternion_to_matrix,
    random_quaternions,
)
from spinifel.orientation.matching import match_orientations
from spinifel.orientation.polar import (
    PolarSlicer,
    bin_images,
    correlate,
    direction_quaternions,
    fibonacci_directions,
    make_polar_grid,
    match_polar,
    polar_orientation_grid,
    polar_points,
    polar_sizes,
    prepare_images,
    slice_terms,
    smooth_size,
)
from spinifel.orientation.slicing import Slicer
from spinifel.phasing.algorithms import autocorrelation_from_density


def _problem(n_pixels=32, M=21, seed=3):
    """A random compact density's autocorrelation and a flat 6 keV detector (the bench's
    synthetic problem at a small size)."""
    rng = np.random.default_rng(seed)
    idx = np.indices((M, M, M)) - (M - 1) / 2
    rho = np.zeros((M, M, M))
    for c in rng.uniform(-M / 8, M / 8, (12, 3)):
        rho += np.exp(-((idx - c[:, None, None, None]) ** 2).sum(0) / 2.0)
    ac = autocorrelation_from_density(rho)
    pos = flat_detector_positions(n_pixels, 1.5e-3 * 64 / n_pixels, 0.2,
                                  photon_energy_to_wavelength(6000.0)).reshape(-1, 3).T
    return ac, pos, float(np.linalg.norm(pos, axis=0).max())


def _grid_step(n_dir, n_psi):
    """One step of the factorised grid: the larger of the in-plane step and the
    nearest-neighbour distance of the directions (measured)."""
    d = fibonacci_directions(n_dir)
    cos = np.clip(d @ d.T, -1, 1)
    np.fill_diagonal(cos, -1)
    nn = np.arccos(cos.max(1))
    return max(2 * np.pi / n_psi, float(nn.max()))


def test_factorised_grid_is_an_orientation_grid(rng):
    n_dir, n_psi = polar_sizes(3000)
    assert n_psi == smooth_size(n_psi) and abs(n_dir * n_psi - 3000) <= n_psi
    grid = polar_orientation_grid(n_dir, n_psi)
    assert grid.shape == (n_dir * n_psi, 4)
    assert np.allclose(np.linalg.norm(grid, axis=1), 1, atol=1e-14) and np.all(grid[:, 0] >= 0)
    r = quaternion_to_matrix(grid).reshape(n_dir, n_psi, 3, 3)
    # R(q(d, m)) e_z is direction d for every in-plane angle m
    assert np.allclose(r[..., 2], fibonacci_directions(n_dir)[:, None, :], atol=1e-12)
    # covering: a random rotation is within one grid step of the grid, and no two grid
    # points coincide (a broken factorisation, e.g. Rz on the wrong side, fails both)
    step = _grid_step(n_dir, n_psi)
    test = random_quaternions(500, rng)
    nearest = np.min(angle_between(test[:, None, :], grid[None, :, :]), axis=1)
    assert nearest.max() < step
    sub = grid[rng.choice(len(grid), 300, replace=False)]
    pair = angle_between(sub[:, None, :], grid[None, :, :])
    assert np.sort(pair, axis=1)[:, 1].min() > 0.2 * 2 * np.pi / n_psi


def test_direction_quaternions_take_ez_to_the_direction():
    d = fibonacci_directions(50)
    r = quaternion_to_matrix(direction_quaternions(d))
    assert np.allclose(r[:, :, 2], d, atol=1e-14)


def test_rotated_slice_is_the_shifted_polar_slice():
    """The slice at R(q_d) Rz(2 pi m / n_psi), evaluated by the ordinary slicer at the polar
    bin centres, equals the polar slice of q_d shifted by m * step angular bins."""
    ac, pos, extent = _problem()
    pg = make_polar_grid(pos, n_psi=12)
    pts = polar_points(pg)
    n_dir = 5
    grid = polar_orientation_grid(n_dir, pg.n_psi)
    ref = Slicer(ac, pts, extent, 1e-12, np.float64).slices(grid)
    ref = ref.reshape(n_dir, pg.n_psi, pg.n_rings, pg.n_angles)
    polar = PolarSlicer(ac, pg, extent, 1e-12, np.float64).slices(
        direction_quaternions(fibonacci_directions(n_dir)))
    scale = np.abs(ref).max()
    for m in (0, 1, 5, 11):
        assert np.allclose(ref[:, m], np.roll(polar, -m * pg.step, axis=2),
                           atol=1e-10 * scale, rtol=0)
    # the shift goes this way round only
    assert not np.allclose(ref[:, 1], np.roll(polar, pg.step, axis=2), atol=1e-3 * scale)


def test_polar_points_lie_on_the_pixels_ewald_sphere():
    _, pos, _ = _problem()
    pg = make_polar_grid(pos, n_psi=10)
    lam = photon_energy_to_wavelength(6000.0)
    assert pg.wavelength == pytest.approx(lam, rel=1e-9)
    p = polar_points(pg)
    s = np.linalg.norm(p, axis=0)
    assert np.allclose(p[2], -lam * s**2 / 2, rtol=1e-9, atol=0)


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_binning_spreads_pixels_with_their_weights(rng, interpolation):
    _, pos, _ = _problem(n_pixels=16)
    pg = make_polar_grid(pos, n_psi=8, interpolation=interpolation)
    assert np.allclose(pg.pixel_weights.sum(1), 1, atol=1e-15)
    assert pg.counts.sum() == pytest.approx(pos.shape[1], rel=1e-14)
    x = rng.standard_normal((3, pos.shape[1]))
    b = bin_images(x, pg).reshape(3, -1)
    ref = np.zeros_like(b)
    for p in range(pos.shape[1]):
        for k, w in zip(pg.pixel_bins[p], pg.pixel_weights[p]):
            ref[:, k] += w * x[:, p]
    assert np.allclose(b, ref, rtol=0, atol=1e-13)


def test_linear_interpolation_reproduces_linear_functions():
    """A slice linear in |s| along each ring and constant in angle is read back exactly at
    the pixels (wrong ring radii or swapped weights fail)."""
    _, pos, _ = _problem(n_pixels=16)
    pg = make_polar_grid(pos, n_psi=8)
    y = np.broadcast_to(3.0 + 2.0 * pg.radii[:, None] / pg.radii[-1],
                        (pg.n_rings, pg.n_angles)).ravel()
    s = np.linalg.norm(pos, axis=0)
    assert np.allclose(pg.matrix() @ y, 3.0 + 2.0 * s / s.max(), rtol=1e-12)


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_fft_correlation_equals_direct_loop(rng, interpolation):
    """Cross terms and norms by FFT equal, for every in-plane angle, the sums over the pixels
    of the image times the slice interpolated at the pixels (and of its square)."""
    _, pos, _ = _problem(n_pixels=16)
    pg = make_polar_grid(pos, n_psi=9, interpolation=interpolation)
    n, B = 4, 3
    x = rng.uniform(0, 2, (n, pos.shape[1]))
    y = rng.uniform(0, 2, (B, pg.n_rings, pg.n_angles))
    pim = prepare_images(x, pg, "sqrt", np.float64)
    spec, norms = slice_terms(y, pg, "sqrt", np.float64)
    cross = correlate(pim.spectra, spec, pg)
    W = pg.matrix().toarray()
    ref = np.empty((n, B, pg.n_psi))
    ref_n = np.empty((B, pg.n_psi))
    for m in range(pg.n_psi):
        shifted = np.roll(np.sqrt(y), -m * pg.step, axis=2).reshape(B, -1)  # y(k, j + m L)
        at_pixels = shifted @ W.T  # (B, P)
        ref[:, :, m] = np.sqrt(x) @ at_pixels.T
        ref_n[:, m] = (at_pixels**2).sum(1)
    assert np.allclose(cross, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    assert np.allclose(norms, ref_n, rtol=0, atol=1e-12 * np.abs(ref_n).max())
    assert np.allclose(pim.image_sq, x.sum(1), rtol=1e-13)


def _search_pair(ac, pos, extent, images, n_dir, n_psi, scale, transform, dtype=np.float32):
    """Polar and exhaustive search on the same factorised grid."""
    pg = make_polar_grid(pos, n_psi)
    dq = direction_quaternions(fibonacci_directions(n_dir))
    grid = polar_orientation_grid(n_dir, n_psi)
    pol = match_polar(images, pg, PolarSlicer(ac, pg, extent, 1e-6, dtype).iter_batches(dq, 40),
                      scale, transform, 256, dtype)
    exh = match_orientations(images, Slicer(ac, pos, extent, 1e-6, dtype).iter_batches(grid, 200),
                             scale, 256, transform)
    return grid, pol, exh


@pytest.mark.parametrize("scale,transform", [(False, "none"), (True, "sqrt")])
def test_noise_free_recovers_true_grid_orientations(rng, scale, transform):
    ac, pos, extent = _problem()
    n_dir, n_psi = polar_sizes(2000)
    grid = polar_orientation_grid(n_dir, n_psi)
    truth = rng.choice(len(grid), 60, replace=False)
    images = Slicer(ac, pos, extent, 1e-6, np.float64).slices(grid[truth])
    images *= rng.uniform(0.5, 2.0, (60, 1)) if scale else 1.0
    _, pol, _ = _search_pair(ac, pos, extent, images, n_dir, n_psi, scale, transform,
                             np.float64)
    err = angle_between(grid[pol.best_index], grid[truth])
    step = _grid_step(n_dir, n_psi)
    print("noise-free: exact", np.mean(pol.best_index == truth), "within a step",
          np.mean(err <= step))
    assert np.all(err <= step)
    assert np.mean(pol.best_index == truth) >= 0.9


def test_polar_agrees_with_exhaustive_on_noisy_data(rng):
    ac, pos, extent = _problem()
    n_dir, n_psi = polar_sizes(2000)
    q = random_quaternions(300, rng)
    clean = np.maximum(Slicer(ac, pos, extent, 1e-6, np.float64).slices(q), 0)
    photons = 3000.0
    images = rng.poisson(clean * (photons / clean.sum(1, keepdims=True))).astype(np.float32)
    grid, pol, exh = _search_pair(ac, pos, extent, images, n_dir, n_psi, True, "sqrt")
    err = angle_between(grid[pol.best_index], grid[exh.best_index])
    step = _grid_step(n_dir, n_psi)
    frac = float(np.mean(err <= step))
    print(f"polar vs exhaustive: same index {np.mean(pol.best_index == exh.best_index):.3f}, "
          f"within one step {frac:.3f}")
    assert frac >= 0.99
