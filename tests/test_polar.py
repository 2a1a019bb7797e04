"""Polar orientation search (in-plane rotations by FFT) against direct references."""

import sys
from pathlib import Path

import numpy as np
import pytest

from spinifel.geometry.detector import photon_energy_to_wavelength
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
    split_slices,
)
from spinifel.orientation.slicing import Slicer
from spinifel.phasing.algorithms import autocorrelation_from_density


def _problem(n_pixels=32, M=21, seed=3):
    """A random compact density's autocorrelation and a flat 6 keV detector (the bench's
    synthetic problem at a small size)."""
    from spinifel.bench.runner import synthetic_model

    return synthetic_model(M, n_pixels, np.random.default_rng(seed))


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


def _shift(flat, grid, m):
    """Polar slices ``(B, n_points)`` of ``q_d`` turned into those of ``q_d Rz(2 pi m / n_psi)``:
    every annulus's rings rolled by ``m`` in-plane steps, ``y(k, j + m L)``."""
    parts = [np.roll(y, -m * (a.n_angles // grid.n_psi), axis=2).reshape(len(flat), -1)
             for a, y in zip(grid.annuli, split_slices(flat, grid))]
    return np.concatenate(parts, axis=1)


def test_rotated_slice_is_the_shifted_polar_slice():
    """The slice at R(q_d) Rz(2 pi m / n_psi), evaluated by the ordinary slicer at the polar
    bin centres, equals the polar slice of q_d shifted by m in-plane steps."""
    ac, pos, extent = _problem()
    pg = make_polar_grid(pos, n_psi=12)
    assert len(pg.annuli) > 2  # several angular samplings are exercised
    pts = polar_points(pg)
    n_dir = 5
    grid = polar_orientation_grid(n_dir, pg.n_psi)
    ref = Slicer(ac, pts, extent, 1e-12, np.float64).slices(grid).reshape(n_dir, pg.n_psi, -1)
    polar = PolarSlicer(ac, pg, extent, 1e-12, np.float64).slices(
        direction_quaternions(fibonacci_directions(n_dir)))
    scale = np.abs(ref).max()
    for m in (0, 1, 5, 11):
        assert np.allclose(ref[:, m], _shift(polar, pg, m), atol=1e-10 * scale, rtol=0)
    # the shift goes this way round only
    assert not np.allclose(ref[:, 1], _shift(polar, pg, -1), atol=1e-3 * scale)


def test_polar_points_lie_on_the_pixels_ewald_sphere():
    _, pos, _ = _problem()
    pg = make_polar_grid(pos, n_psi=10)
    lam = photon_energy_to_wavelength(6000.0)
    assert pg.wavelength == pytest.approx(lam, rel=1e-9)
    p = polar_points(pg)
    s = np.linalg.norm(p, axis=0)
    assert np.allclose(p[2], -lam * s**2 / 2, rtol=1e-9, atol=0)
    assert p.shape == (3, pg.n_points)
    # every pixel is read from exactly one annulus
    assert np.array_equal(np.sort(np.concatenate([a.pixels for a in pg.annuli])),
                          np.arange(pos.shape[1]))


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_binning_spreads_pixels_with_their_weights(rng, interpolation):
    _, pos, _ = _problem(n_pixels=16)
    pg = make_polar_grid(pos, n_psi=8, interpolation=interpolation)
    x = rng.standard_normal((3, pos.shape[1]))
    total = 0.0
    for ann in pg.annuli:
        assert np.allclose(ann.weights.sum(1), 1, atol=1e-15)
        total += ann.counts.sum()
        b = bin_images(x, ann).reshape(3, -1)
        ref = np.zeros_like(b)
        for q, p in enumerate(ann.pixels):
            for k, w in zip(ann.bins[q], ann.weights[q]):
                ref[:, k] += w * x[:, p]
        assert np.allclose(b, ref, rtol=0, atol=1e-13)
    assert total == pytest.approx(pos.shape[1], rel=1e-14)


def test_linear_interpolation_reproduces_linear_functions():
    """A slice linear in |s| along each ring and constant in angle is read back exactly at
    the pixels (wrong ring radii, annulus offsets or swapped weights fail)."""
    _, pos, _ = _problem(n_pixels=16)
    pg = make_polar_grid(pos, n_psi=8)
    s_pts = np.linalg.norm(polar_points(pg), axis=0)
    s = np.linalg.norm(pos, axis=0)
    assert np.allclose(pg.matrix() @ (3.0 + 2.0 * s_pts / s.max()), 3.0 + 2.0 * s / s.max(),
                       rtol=1e-12)


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_fft_correlation_equals_direct_loop(rng, interpolation):
    """Cross terms and norms by FFT equal, for every in-plane angle, the sums over the pixels
    of the image times the slice interpolated at the pixels (and of its square)."""
    _, pos, _ = _problem(n_pixels=16)
    pg = make_polar_grid(pos, n_psi=9, interpolation=interpolation)
    assert len(pg.annuli) > 1
    n, B = 4, 3
    x = rng.uniform(0, 2, (n, pos.shape[1]))
    y = rng.uniform(0, 2, (B, pg.n_points))
    pim = prepare_images(x, pg, "sqrt", np.float64)
    spec, norms = slice_terms(y, pg, "sqrt", np.float64)
    cross = correlate(pim.spectra, spec, pg)
    W = pg.matrix().toarray()
    ref = np.empty((n, B, pg.n_psi))
    ref_n = np.empty((B, pg.n_psi))
    for m in range(pg.n_psi):
        at_pixels = _shift(np.sqrt(y), pg, m) @ W.T  # (B, P)
        ref[:, :, m] = np.sqrt(x) @ at_pixels.T
        ref_n[:, m] = (at_pixels**2).sum(1)
    assert np.allclose(cross, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    assert np.allclose(norms, ref_n, rtol=0, atol=1e-12 * np.abs(ref_n).max())
    assert np.allclose(pim.image_sq, x.sum(1), rtol=1e-13)


def _search_pair(ac, pos, extent, images, n_dir, n_psi, scale, transform, dtype=np.float32,
                 candidates=2):
    """Polar (with exact rescoring) and exhaustive search on the same factorised grid."""
    pg = make_polar_grid(pos, n_psi)
    dq = direction_quaternions(fibonacci_directions(n_dir))
    grid = polar_orientation_grid(n_dir, n_psi)
    slicer = Slicer(ac, pos, extent, 1e-6, dtype)
    pol = match_polar(images, pg, PolarSlicer(ac, pg, extent, 1e-6, dtype).iter_batches(dq, 40),
                      scale, transform, 256, dtype, candidates, (grid, slicer))
    exh = match_orientations(images, slicer.iter_batches(grid, 200), scale, 256, transform)
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
    """The regression test of issue 15: on noisy images polar search (screening plus exact
    rescoring of 2 candidates) picks the exhaustive search's orientation on the same grid,
    within one grid step, for >= 99% of images (the polar score alone is reported)."""
    ac, pos, extent = _problem()
    n_dir, n_psi = polar_sizes(2000)
    q = random_quaternions(300, rng)
    clean = np.maximum(Slicer(ac, pos, extent, 1e-6, np.float64).slices(q), 0)
    photons = 3000.0
    images = rng.poisson(clean * (photons / clean.sum(1, keepdims=True))).astype(np.float32)
    grid, pol, exh = _search_pair(ac, pos, extent, images, n_dir, n_psi, True, "sqrt")
    pg = make_polar_grid(pos, n_psi)
    dq = direction_quaternions(fibonacci_directions(n_dir))
    screen = match_polar(images, pg, PolarSlicer(ac, pg, extent, 1e-6).iter_batches(dq, 40),
                         True, "sqrt", 256)
    step = _grid_step(n_dir, n_psi)
    frac = float(np.mean(angle_between(grid[pol.best_index], grid[exh.best_index]) <= step))
    frac0 = float(np.mean(angle_between(grid[screen.best_index], grid[exh.best_index]) <= step))
    print(f"polar vs exhaustive within one step: {frac:.3f} (polar score alone {frac0:.3f})")
    assert frac >= 0.99
    assert frac0 >= 0.9  # the screening itself is close


def test_solver_polar_search_finds_true_orientations(tmp_path):
    """Catches the solver dispatching "polar" with the wrong grid, pixels or index layout:
    noise-free slices of the true model at factorised-grid orientations are matched to
    exactly those grid points (tiny problem, after rescoring)."""
    import dataclasses

    from helpers import TINY_ALGORITHM, simulate_tiny, tiny_config
    from spinifel.evaluate.report import load_ground_truth
    from spinifel.parallel.context import ParallelContext
    from spinifel.pipeline import MTIPSolver, Problem, SolverState

    path = simulate_tiny(tmp_path / "tiny.h5", 60)
    cfg = tiny_config(path, tmp_path / "out", dict(TINY_ALGORITHM, generations=2,
                                                    search="polar", n_orientations=600))
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="double"))
    p = Problem.open(cfg, ParallelContext.serial()).load()
    n_dir, n_psi = p.polar_sizes
    assert np.array_equal(p.grid, polar_orientation_grid(n_dir, n_psi))
    truth = load_ground_truth(path, cfg.algorithm.M, p.extent)
    ac = autocorrelation_from_density(truth.density.astype(np.float64))
    k = np.random.default_rng(1).choice(len(p.grid), size=p.n_local, replace=False)
    p.images = Slicer(ac, p.positions, p.extent, 1e-12, np.float64).slices(p.grid[k])
    st = SolverState.initial(p)
    st.generation = 0
    st.full.phased_ac = ac
    a = MTIPSolver(p, st).orient()
    np.testing.assert_array_equal(a.index, k)
    np.testing.assert_array_equal(a.orientations, p.grid[k])


@pytest.mark.parametrize("keys,named", [
    ({"search": "polar", "matching_mode": "distributed"}, "algorithm.search"),
    ({"search": "polar", "score": "poisson", "refine_rounds": 0, "background": "flat"},
     "algorithm.background"),
    ({"search": "polar", "polar_n_psi": 3}, "algorithm.polar_n_psi"),
    ({"search": "polar", "polar_candidates": 0}, "algorithm.polar_candidates"),
])
def test_polar_config_refusals(keys, named):
    """Catches a polar setting that is accepted and then ignored or crashes later: one
    ConfigError naming the key."""
    from spinifel.config import load_config
    from spinifel.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        load_config(None, (), {"algorithm": keys})
    assert load_config(None, (), {"algorithm": {"search": "polar"}}).algorithm.polar_n_psi == 0


_DISTRIBUTED_SCRIPT = '''
import sys
import numpy as np
from mpi4py import MPI
sys.path.insert(0, sys.argv[2])
from test_polar import _problem
from spinifel.orientation.polar import *
from spinifel.orientation.slicing import Slicer
from spinifel.geometry.orientations import random_quaternions

comm = MPI.COMM_WORLD
ac, pos, extent = _problem()
n_dir, n_psi = polar_sizes(1500)
pg = make_polar_grid(pos, n_psi)
dirs = direction_quaternions(fibonacci_directions(n_dir))
grid = polar_orientation_grid(n_dir, n_psi)
rng = np.random.default_rng(5)
clean = np.maximum(Slicer(ac, pos, extent, 1e-6, np.float64).slices(random_quaternions(30, rng)), 0)
images = rng.poisson(clean * (2000 / clean.sum(1, keepdims=True))).astype(np.float64)
rows = [np.arange(0, 13), np.arange(13, 30)][comm.Get_rank()] if comm.Get_size() == 2 else np.arange(30)
slicer = Slicer(ac, pos, extent, 1e-6, np.float64)
st = match_polar_distributed(comm, images[rows], pg, PolarSlicer(ac, pg, extent, 1e-6, np.float64),
                             dirs, 7, True, "sqrt", 8, np.float64, 3, (grid, slicer))
res = comm.gather((st.best_index, st.best_dist), root=0)
if comm.Get_rank() == 0:
    np.savez(sys.argv[1], index=np.concatenate([r[0] for r in res]),
             dist=np.concatenate([r[1] for r in res]))
'''


@pytest.mark.skipif(not (Path(sys.executable).parent / "mpiexec").exists(),
                    reason="no mpiexec beside this python")
def test_distributed_polar_equals_one_rank(tmp_path):
    """Catches a wrong direction offset, image row offset or candidate merge when the beam
    directions are split over 2 ranks: the result equals the one-rank search exactly."""
    import os
    import subprocess

    script = tmp_path / "run.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    out = {}
    for n in (1, 2):
        f = tmp_path / f"np{n}.npz"
        r = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", str(n),
                            sys.executable, str(script), str(f), str(Path(__file__).parent)],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        out[n] = np.load(f)
    assert np.array_equal(out[1]["index"], out[2]["index"])
    assert np.allclose(out[1]["dist"], out[2]["dist"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("fit_scale", [False, True])
def test_poisson_polar_score_equals_direct_score_on_binned_data(rng, fit_scale):
    """Catches a wrong log/floor, sum or shift in the Poisson polar score: the streamed
    posterior's best orientation and log-likelihood equal a direct loop over directions and
    angles of ``sum_b K_b log W_b - phi sum_b n_b W_b`` on the binned counts."""
    from spinifel.orientation.polar import poisson_terms, score_polar

    ac, pos, extent = _problem(n_pixels=16, M=15)
    n_dir, n_psi = 6, 8
    pg = make_polar_grid(pos, n_psi, interpolation="nearest")
    dq = direction_quaternions(fibonacci_directions(n_dir))
    y = PolarSlicer(ac, pg, extent, 1e-12, np.float64).slices(dq)
    y[:, ::7] = -1.0  # below the floor: exercised
    counts = rng.poisson(0.3, (5, pos.shape[1])).astype(np.float64)
    phi = rng.uniform(0.5, 2.0, 5)
    binned = np.concatenate([bin_images(counts, a).reshape(5, -1) for a in pg.annuli], axis=1)
    n_b = np.concatenate([a.counts.ravel() for a in pg.annuli])
    mean = (y @ n_b) / n_b.sum()
    w = np.maximum(y, 1e-3 * mean[:, None])
    ref = np.empty((5, n_dir, n_psi))
    for m in range(n_psi):
        ws = _shift(w, pg, m)
        s = ws @ n_b
        ref[:, :, m] = binned @ np.log(ws).T - (counts.sum(1)[:, None] * np.log(s)[None, :]
                                                 if fit_scale else phi[:, None] * s[None, :])
    spec, sums = poisson_terms(y, pg, 1e-3, np.float64)
    post = score_polar(counts, pg, [(0, y[:4]), (4, y[4:])], beta=1.0, max_kept=1,
                       posterior_mass=1.0, fluence=phi, fit_scale=fit_scale,
                       dtype=np.float64)
    flat = ref.reshape(5, -1)
    assert np.array_equal(post.indices[:, 0], flat.argmax(1))
    assert np.allclose(post.log_likelihood, flat.max(1), rtol=1e-10, atol=1e-10)
    ref_s = np.stack([_shift(w, pg, m) @ n_b for m in range(n_psi)], axis=1)
    assert np.allclose(sums, ref_s, rtol=1e-12)
    # the posterior's normaliser covers every orientation exactly once
    assert post.n_orientations == n_dir * n_psi


def test_solver_poisson_polar_on_true_model(tmp_path):
    """Catches the Poisson polar branch of the solver scoring the wrong grid, pixels or
    fluence: bright Poisson images of the true model at factorised-grid orientations get
    those orientations as their most likely ones, with a normalised posterior."""
    import dataclasses

    from helpers import TINY_ALGORITHM, tiny_config
    from spinifel.evaluate.report import load_ground_truth
    from spinifel.parallel.context import ParallelContext
    from spinifel.pipeline import MTIPSolver, Problem, SolverState
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    path = tmp_path / "counts.h5"
    simulate_dataset(path, builtin_molecule(seed=0, n_atoms=300), n_images=40, n_pixels=16,
                     pixel_size_m=6e-3, M=25, seed=0, beamstop_radius_px=1.0,
                     photons_per_image=500.0)
    cfg = tiny_config(path, tmp_path / "out", dict(TINY_ALGORITHM, generations=2, refine_rounds=0,
                                                   score="poisson", search="polar",
                                                   n_orientations=600))
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="double"))
    p = Problem.open(cfg, ParallelContext.serial()).load()
    truth = load_ground_truth(path, cfg.algorithm.M, p.extent)
    ac = autocorrelation_from_density(truth.density.astype(np.float64))
    rng = np.random.default_rng(1)
    k = rng.choice(len(p.grid), size=p.n_local, replace=False)
    slices = np.clip(Slicer(ac, p.positions, p.extent, 1e-12, np.float64).slices(p.grid[k]),
                     0, None)
    p.images = rng.poisson(slices / slices.sum(axis=1, keepdims=True) * 2e5).astype(np.float64)
    st = SolverState.initial(p)
    st.generation = 4
    st.full.phased_ac = ac
    a = MTIPSolver(p, st).orient()
    print("poisson polar: exact", np.mean(a.index == k))
    np.testing.assert_array_equal(a.index, k)
    np.testing.assert_allclose(a.posterior.weights.sum(axis=1), 1.0, atol=1e-13)
    assert a.posterior.n_orientations == len(p.grid)
