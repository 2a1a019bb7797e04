"""The Poisson score wired into the solver (issue 13): orient/merge with posteriors, the
one-hot limit equal to the hard merge, photon-count and configuration refusals, M chosen
from the data, and a tiny photon-limited reconstruction from random orientations (slow)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers import TINY_ALGORITHM, simulate_tiny, tiny_config
from spinifel.cli import main
from spinifel.errors import ConfigError, DatasetError
from spinifel.orientation.likelihood import Posterior
from spinifel.orientation.slicing import Slicer
from spinifel.parallel.context import ParallelContext
from spinifel.phasing.algorithms import autocorrelation_from_density
from spinifel.pipeline import Assignment, MTIPSolver, Problem, SolverState

EPS64 = np.finfo(np.float64).eps


def _simulate_counts(path, n_images, photons, n_atoms=300, n_pixels=16, M=25, seed=0):
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    simulate_dataset(path, builtin_molecule(seed=0, n_atoms=n_atoms), n_images=n_images,
                     n_pixels=n_pixels, pixel_size_m=6e-3 * 16 / n_pixels, M=M, seed=seed,
                     beamstop_radius_px=1.0, photons_per_image=photons)
    return path


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    return _simulate_counts(tmp_path_factory.mktemp("data") / "counts.h5", 60, 500.0)


@pytest.fixture(scope="module")
def noise_free(tmp_path_factory):
    return simulate_tiny(tmp_path_factory.mktemp("data") / "tiny.h5", 40)


def _problem(path, tmp_path, **algo):
    cfg = tiny_config(path, tmp_path / "never_written",
                      {**TINY_ALGORITHM, "generations": 2, "refine_rounds": 0, **algo})
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="double"))
    return Problem.open(cfg, ParallelContext.serial()).load()


def _error_lines(capsys):
    """The CLI's error lines (a logger left by an earlier test on a closed stream may add
    '--- Logging error ---' noise to stderr; only the CLI's own lines are counted)."""
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("spinifel-mpi: error")]


def _true_ac(problem):
    from spinifel.evaluate.report import load_ground_truth

    truth = load_ground_truth(problem.cfg.data.path, problem.cfg.algorithm.M, problem.extent)
    return autocorrelation_from_density(truth.density.astype(np.float64))


def test_one_hot_posterior_merge_equals_hard_merge(noise_free, tmp_path):
    """Catches a solver merge that drops or mis-weights the posterior (e.g. ignores the
    kept orientations, uses the wrong grid rows, or forgets the half sets' rows): with
    one-hot posteriors at fluence 1 the merged autocorrelation equals the hard merge at the
    same grid orientations, to round-off, with and without half sets."""
    for validation in (None, {"half_sets": "shared"}):
        cfg = tiny_config(noise_free, tmp_path / "x", dict(TINY_ALGORITHM, generations=2),
                          validation)
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime,
                                                                   precision="double"))
        p = Problem.open(cfg, ParallelContext.serial()).load()
        k = np.random.default_rng(5).integers(0, len(p.grid), p.n_local)
        n = p.n_local
        post = Posterior(indices=np.stack([k, -np.ones(n, np.int64)], axis=1),
                         weights=np.stack([np.ones(n), np.zeros(n)], axis=1),
                         n_kept=np.ones(n, np.int64), log_likelihood=np.zeros(n),
                         entropy=np.zeros(n), dropped_mass=np.zeros(n),
                         expected_slice_sum=np.ones(n), fluence=np.ones(n),
                         n_orientations=len(p.grid), mean_slice_sum=1.0, beta=1.0)
        solver = MTIPSolver(p, SolverState.initial(p))
        hard = solver.merge(Assignment(orientations=p.grid[k]))
        soft = solver.merge(Assignment(orientations=p.grid[k], index=k, posterior=post))
        # the aggregated NUFFT sums in another order: round-off, amplified by the CG solve
        a, b = hard.result.autocorrelation, soft.result.autocorrelation
        assert hard.result.lam_rel == soft.result.lam_rel
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max(), np.abs(a - b).max()
        if validation:
            for ha, hb in zip(hard.halves, soft.halves):
                assert np.abs(ha - hb).max() <= 1e-6 * np.abs(ha).max()


def test_orient_poisson_on_true_model(counts, tmp_path):
    """Catches a Poisson orientation stage that scores against the wrong model, mixes up
    images or loses the posterior: bright Poisson images of the true model at known grid
    orientations get those orientations as their most likely ones; the assignment carries
    the posterior (rows sum to 1), its metrics and the hard orientations."""
    p = _problem(counts, tmp_path, score="poisson")
    ac = _true_ac(p)
    rng = np.random.default_rng(1)
    k = rng.choice(len(p.grid), size=p.n_local, replace=False)
    s = Slicer(ac, p.positions, p.extent, 1e-12, np.float64, 1)
    slices = np.clip(s.slices(p.grid[k]), 0, None)
    p.images = rng.poisson(slices / slices.sum(axis=1, keepdims=True) * 2e5).astype(np.float64)
    st = SolverState.initial(p)
    st.generation = 4  # beta 1 by then? the assertions hold at any beta
    st.full.phased_ac = ac
    a = MTIPSolver(p, st).orient()
    np.testing.assert_array_equal(a.index, k)
    np.testing.assert_array_equal(a.orientations, p.grid[k])
    w = a.posterior.weights
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=100 * EPS64)
    assert a.metrics["n_images"] == p.n_local and a.metrics["beta"] > 0
    assert a.background is None


def test_poisson_refuses_non_count_data(noise_free, tmp_path, capsys):
    """Catches the Poisson score running on intensities that are not photon counts (noise-
    free simulation): DatasetError at Problem build, and through the CLI one line, exit 2."""
    with pytest.raises(DatasetError, match="photon counts"):
        _problem(noise_free, tmp_path, score="poisson")
    code = main(["run", "--set", f"data.path={noise_free}", "--out", str(tmp_path / "o"),
                 "--set", "algorithm.score=poisson", "--set", "algorithm.refine_rounds=0",
                 "--set", "algorithm.M=25", "--set", "algorithm.n_orientations=20"])
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert "data.adu_per_photon" in err[0], err[0]


@pytest.mark.parametrize("keys,named", [
    ({"search": "coarse_to_fine", "refine_rounds": 0}, "algorithm.search"),
    ({"matching_mode": "distributed", "refine_rounds": 0}, "algorithm.matching_mode"),
])
def test_poisson_refuses_euclidean_only_searches(counts, tmp_path, capsys, keys, named):
    """Catches the coarse-to-fine search or the distributed matching silently ranking
    orientations by the Euclidean distance under the Poisson score: a
    ConfigError naming the key at config build, and through the CLI one line, exit 2."""
    from spinifel.config import load_config

    with pytest.raises(ConfigError, match=named):
        load_config(None, (), {"algorithm": dict(keys, score="poisson")})
    sets = [x for k, v in keys.items() for x in ("--set", f"algorithm.{k}={v}")]
    code = main(["run", "--set", f"data.path={counts}", "--out", str(tmp_path / "o"),
                 "--set", "algorithm.score=poisson", *sets])
    err = _error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert named in err[0], err[0]
    assert not (tmp_path / "o" / "result.h5").exists()
    # local refinement is accepted (it maximises the likelihood); auto is 3 rounds, 2 for
    # the Euclidean score
    load_config(None, (), {"algorithm": {"score": "poisson", "refine_rounds": 2}})
    assert load_config(None, ["algorithm.score=poisson"]).algorithm.refine_rounds == 3
    assert load_config(None, []).algorithm.refine_rounds == 2


def test_orient_poisson_refines_off_the_grid_and_merges_there(counts, tmp_path):
    """Catches likelihood refinement not applied in a refinement generation, applied before
    beta reaches 1, or a merge that reads the grid instead of the refined orientations:
    bright Poisson images of the true model at random (off-grid) orientations; in the last
    generation (beta 1) the orientations are refined several times closer to the truth than
    the grid's best, the merge equals the hard merge at the refined orientations, and a
    generation still annealing (beta < 1) keeps the grid posterior."""
    from spinifel.geometry.orientations import angle_between, random_quaternions

    p = _problem(counts, tmp_path, score="poisson", refine_rounds=3, refine_generations=3,
                 generations=4, n_orientations=300, beta_start=0.1)
    ac = _true_ac(p)
    rng = np.random.default_rng(3)
    truth = random_quaternions(p.n_local, rng)
    s = Slicer(ac, p.positions, p.extent, 1e-12, np.float64, 1)
    slices = np.clip(s.slices(truth), 0, None)
    p.images = rng.poisson(slices / slices.sum(axis=1, keepdims=True) * 2e5).astype(np.float64)
    st = SolverState.initial(p)
    st.full.phased_ac = ac
    st.generation = 3  # the solver runs generation 4 of 4: refinement, beta = 1
    solver = MTIPSolver(p, st)
    a = solver.orient()
    grid_err = np.median(angle_between(p.grid[a.index], truth))
    fine_err = np.median(angle_between(a.orientations, truth))
    assert a.posterior_grid is a.orientations and fine_err < 0.3 * grid_err, (grid_err, fine_err)
    np.testing.assert_array_equal(a.posterior.indices[:, 0], np.arange(p.n_local))
    assert "refinement" in solver.timings
    post = dataclasses.replace(a.posterior, fluence=np.ones(p.n_local))
    soft = solver.merge(dataclasses.replace(a, posterior=post)).result.autocorrelation
    hard = solver.merge(Assignment(orientations=a.orientations)).result.autocorrelation
    assert np.abs(soft - hard).max() <= 1e-6 * np.abs(hard).max()
    st.generation = 0  # generation 1: within refine_generations, but beta = beta_start
    b = MTIPSolver(p, st).orient()
    assert b.metrics["beta"] < 1 and b.posterior_grid is None
    np.testing.assert_array_equal(b.orientations, p.grid[b.index])


def test_M_zero_chooses_M_from_the_data(tmp_path):
    """Catches algorithm.M = 0 left at 0 (a crash later) or a box unrelated to the particle:
    the chosen M is odd, replaces the config everywhere the solver reads it, and lies within
    the diameter estimator's calibration error (+-25 %) of the M that the particle's true
    largest dimension (from its atoms) needs."""
    from spinifel.geometry.box import choose_M
    from spinifel.simulate.structure import builtin_molecule

    path = _simulate_counts(tmp_path / "m.h5", 200, 2000.0)
    p = _problem(path, tmp_path, M=0)
    M = p.cfg.algorithm.M
    assert M % 2 == 1 and M >= 9
    assert p.support.shape == (M,) * 3 and p.fourier_mask.shape == (M,) * 3
    assert MTIPSolver(p, SolverState.initial(p))._zeros.shape == (M,) * 3
    xyz = builtin_molecule(seed=0, n_atoms=300).xyz
    d = np.sqrt(((xyz[:, None, :] - xyz[None, :, :]) ** 2).sum(-1)).max() * 1e-10
    M_true = choose_M(d, p.extent, ac_support_radius=p.cfg.algorithm.ac_support_radius)
    assert abs(M - M_true) <= 0.25 * M_true, (M, M_true)


@pytest.mark.slow
def test_photon_limited_reconstruction_converges(tmp_path):
    """Catches a broken Poisson score, posterior or probabilistic merge end to end: a small
    photon-limited problem (built-in molecule, 500 photons per image, 400 images of 24x24)
    reconstructed from random orientations ends with a median orientation error below the
    grid spacing (24.6 deg) and a density correlation above any generation before it locks
    in; random orientations give a median of ~125 deg and correlations of 0.40-0.52.
    Measured: median 17.7 deg, correlation 0.565, fluence 1.01 (the model's slices are
    photons at fluence 1); it locks in two generations after beta reaches 1."""
    from spinifel.pipeline import run_pipeline

    path = _simulate_counts(tmp_path / "p.h5", **PHOTON_LIMITED_DATA)
    out = tmp_path / "out"
    cfg = tiny_config(path, out, dict(PHOTON_LIMITED_ALGORITHM))
    run_pipeline(cfg, ParallelContext.serial(), overwrite=True)
    gens = json.loads((out / "metrics.json").read_text())["generations"]
    ev, post = gens[-1]["evaluation"], gens[-1]["posterior"]
    assert 0.8 < post["fluence"] < 1.25, post
    assert post["beta"] == 1.0 and post["mutual_information"] > 5.0, post
    assert ev["orientation_error_deg"]["median"] <= 30.0, ev["orientation_error_deg"]
    assert ev["density_correlation"] >= 0.54, ev["density_correlation"]


PHOTON_LIMITED_DATA = {"n_images": 400, "photons": 500.0, "n_pixels": 24}
PHOTON_LIMITED_ALGORITHM = dict(TINY_ALGORITHM, generations=12, score="poisson",
                                refine_rounds=0, n_orientations=1000,
                                orientations_per_image=256, beta_start=0.01)


def test_score_auto_chooses_poisson_for_counts_only(counts, noise_free, tmp_path):
    """Catches algorithm.score = "auto" choosing the Poisson score for data that are not
    photon counts (which would then be refused), missing counts, or choosing it where the
    other settings need the Euclidean score; the refinement rounds follow the choice."""
    from spinifel.config import load_config

    assert load_config(overrides=["algorithm.score=auto"]).algorithm.refine_rounds == -1
    p = _problem(counts, tmp_path, score="auto", refine_rounds=-1)
    assert p.cfg.algorithm.score == "poisson" and p.cfg.algorithm.refine_rounds == 3
    # the images were converted to counts (the Poisson path's input), not left as read
    assert np.array_equal(p.images, np.rint(p.images))
    p = _problem(noise_free, tmp_path, score="auto", refine_rounds=-1)
    assert p.cfg.algorithm.score == "euclidean" and p.cfg.algorithm.refine_rounds == 2
    p = _problem(counts, tmp_path, score="auto", search="coarse_to_fine")
    assert p.cfg.algorithm.score == "euclidean"


def test_are_photon_counts():
    """Catches the auto score's count test disagreeing with photon_counts' rule: integers
    within 1e-3, non-negative, finite."""
    from spinifel.orientation.likelihood import are_photon_counts

    assert are_photon_counts(np.array([[0.0, 1.0, 7.0005]]))
    assert not are_photon_counts(np.array([[0.0, 1.5]]))
    assert not are_photon_counts(np.array([[-1.0, 2.0]]))
    assert not are_photon_counts(np.array([[np.nan, 2.0]]))


def test_background_from_the_data_per_mode(tmp_path):
    """Catches ``algorithm.background = "radial"`` not estimated from the data (None: the
    model fit with its feedback; a float: the flat estimate in its place) or the per-shell
    values misplaced (pixel-less shells not 0, or the outer shells off): on images with
    fluence spread 0.5 and a flat background of 0.5 photons/pixel, ``flat`` gives a float
    within 5% of it, ``radial`` an array per shell, 0 where a shell has no good pixel, the
    outer half (where the signal is weak and the background best determined) within 25%,
    the outer quarter within 10% (measured: 0.60 at the middle shell down to 0.50 at the
    edge; the errors grow inwards as the signal dominates)."""
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    path = tmp_path / "bg.h5"
    simulate_dataset(path, builtin_molecule(seed=0, n_atoms=300), n_images=3000, n_pixels=16,
                     pixel_size_m=6e-3, M=25, seed=0, beamstop_radius_px=1.0,
                     photons_per_image=500.0, fluence_sigma=0.5,
                     background_photons_per_pixel=0.5)
    flat = _problem(path, tmp_path, score="poisson", background="flat").data_background
    assert isinstance(flat, float) and flat == pytest.approx(0.5, rel=0.05)
    p = _problem(path, tmp_path, score="poisson", background="radial")
    b = p.data_background
    n_shells = p.cfg.algorithm.background_shells
    pixels = np.bincount(p.shells, minlength=n_shells)
    assert isinstance(b, np.ndarray) and b.shape == (n_shells,)
    assert np.all(b[pixels == 0] == 0) and np.any(pixels == 0)
    np.testing.assert_allclose(b[n_shells // 2:], 0.5, rtol=0.25)
    np.testing.assert_allclose(b[3 * n_shells // 4:], 0.5, rtol=0.1)
    rep = p.background_report  # what metrics.json records
    assert rep["mode"] == "radial" and rep["used"] and rep["photons_per_pixel"] == list(b)
    assert len(rep["error"]) == n_shells and rep["shell_pixels"] == list(pixels)
