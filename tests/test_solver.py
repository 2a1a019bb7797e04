"""The solver's stages one at a time on the tiny problem, without an output directory,
and the whole run equal to a manual ``MTIPSolver`` loop (bitwise)."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from helpers import TINY_ALGORITHM, simulate_tiny, tiny_config
from spinifel.orientation.slicing import Slicer
from spinifel.parallel.context import ParallelContext
from spinifel.phasing.algorithms import autocorrelation_from_density
from spinifel.pipeline import (
    Assignment,
    MTIPSolver,
    Problem,
    SolverState,
    StageTimer,
    model_scale,
    run_pipeline,
)

EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return simulate_tiny(tmp_path_factory.mktemp("data") / "tiny.h5", 120)


def _problem(path, tmp_path, **algo):
    cfg = tiny_config(path, tmp_path / "never_written", dict(TINY_ALGORITHM, generations=2,
                                                              **algo))
    # precision double: noise-free slices and their match are then exact to round-off
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, precision="double"))
    return Problem.open(cfg, ParallelContext.serial()).load()


def _true_ac(problem):
    from spinifel.evaluate.report import load_ground_truth

    truth = load_ground_truth(problem.cfg.data.path, problem.cfg.algorithm.M, problem.extent)
    return autocorrelation_from_density(truth.density.astype(np.float64))


def _slices(problem, ac, quats):
    s = Slicer(ac, problem.positions, problem.extent, 1e-12, np.float64, 1)
    return np.ascontiguousarray(s.slices(quats), dtype=np.float64)


def test_problem_builds_without_output_dir(tiny, tmp_path):
    """Catches a Problem that writes files or loses images: it reads the shard only."""
    p = _problem(tiny, tmp_path)
    assert not (tmp_path / "never_written").exists()
    assert p.images.shape == (120, int(p.geom.mask.sum()))
    assert p.grid.shape == (TINY_ALGORITHM["n_orientations"], 4)
    assert p.fourier_mask.shape == (25, 25, 25) and p.support.dtype == bool
    plan = p.plan()
    assert plan["n_images"] == 120 and plan["images_per_rank"] == [120]


def test_orient_on_true_model_gives_true_orientations(tiny, tmp_path):
    """Catches an orientation stage that matches against the wrong model or mixes up
    images: noise-free slices of the true model at known grid orientations are matched to
    exactly those grid points."""
    p = _problem(tiny, tmp_path)
    ac = _true_ac(p)
    rng = np.random.default_rng(1)
    k = rng.choice(len(p.grid), size=p.n_local, replace=False)
    p.images = _slices(p, ac, p.grid[k])
    st = SolverState.initial(p)
    st.generation = 0  # as after generation 0: the next step matches
    st.full.phased_ac = ac
    solver = MTIPSolver(p, st)
    a = solver.orient()
    np.testing.assert_array_equal(a.index, k)
    np.testing.assert_array_equal(a.orientations, p.grid[k])
    assert a.weights is None and not a.independent


def test_orient_keeps_initial_orientations_in_generation_zero(tiny, tmp_path):
    """Catches generation 0 matching against a model that does not exist yet."""
    p = _problem(tiny, tmp_path)
    st = SolverState.initial(p)
    a = MTIPSolver(p, st).orient()
    assert a.index is None
    np.testing.assert_array_equal(a.orientations, st.orientations)
    np.testing.assert_allclose(np.linalg.norm(a.orientations, axis=1), 1.0, atol=10 * EPS64)


def test_merge_of_true_orientations_reproduces_the_intensity(tiny, tmp_path):
    """Catches a merge that ignores or permutes the assignment: slices of the true model,
    merged at their true orientations, give back the model's intensity on the measured
    shell (correlation ~1), while random orientations do not."""
    p = _problem(tiny, tmp_path)
    ac = _true_ac(p)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((p.n_local, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p.images = _slices(p, ac, q)
    shell = p.fourier_mask

    def corr(merged_ac):
        a = np.fft.fftn(np.fft.ifftshift(merged_ac)).real[np.fft.ifftshift(shell)]
        b = np.fft.fftn(np.fft.ifftshift(ac)).real[np.fft.ifftshift(shell)]
        return float(np.corrcoef(a, b)[0, 1])

    solver = MTIPSolver(p, SolverState.initial(p))
    good = corr(solver.merge(Assignment(orientations=q)).result.autocorrelation)
    other = rng.standard_normal((p.n_local, 4))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    bad = corr(solver.merge(Assignment(orientations=other)).result.autocorrelation)
    assert good > 0.99, good
    assert bad < good - 0.05, (good, bad)


def test_phase_returns_the_model_on_the_data_scale(tiny, tmp_path):
    """Catches a phasing stage that skips the least-squares rescaling (matching would then
    compare images with a model too bright or too dim): rescaled again, the factor is 1."""
    p = _problem(tiny, tmp_path)
    solver = MTIPSolver(p, SolverState.initial(p))
    merged = solver.merge(solver.orient())
    (full,) = solver.phase(merged)
    data_ac = merged.result.autocorrelation
    assert abs(model_scale(full.phased_ac, data_ac, p.fourier_mask) - 1.0) < 1e3 * EPS64
    assert full.density.shape == (25, 25, 25) and full.support.dtype == bool
    assert np.all(full.density[~full.support] == 0)
    assert np.isfinite(full.fourier_error)
    assert "phasing" in solver.timings


def test_advance_and_proceed(tiny, tmp_path):
    """Catches a state that does not advance (an endless evolve) or forgets the match
    index of the last matching when a generation does not match."""
    p = _problem(tiny, tmp_path)
    solver = MTIPSolver(p, SolverState.initial(p))
    report = solver.step()
    assert solver.state.generation == 0 and report.generation == 0 and solver.proceed
    assert np.isnan(report.entry["orientation_change"])
    assert report.orientations.shape == (120, 4) and report.intensity.shape == (25, 25, 25)
    report = solver.step()
    assert solver.state.generation == 1 and report.last and not solver.proceed
    assert solver.state.match_index.shape == (120,)
    idx = solver.state.match_index.copy()
    # an assignment without indices (true orientations) keeps the last ones
    solver.state.generation = 0
    merged = solver.merge(Assignment(orientations=solver.state.orientations))
    solver.advance(Assignment(orientations=solver.state.orientations), merged,
                   solver.phase(merged), float("nan"))
    np.testing.assert_array_equal(solver.state.match_index, idx)


def test_stage_timer_accumulates():
    """Catches a timer that overwrites instead of adding (a stage run twice per
    generation would report only its last run)."""
    t = {"x": 5.0}
    with StageTimer(t, "x"):
        pass
    with StageTimer(t, "y"):
        pass
    assert t["x"] >= 5.0 and t["y"] >= 0.0 and set(t) == {"x", "y"}


@pytest.mark.parametrize("validation", [None, {"half_sets": "independent"}])
def test_run_pipeline_equals_manual_solver_loop(tiny, tmp_path, validation):
    """Catches a handler that changes the reconstruction (e.g. mutates the state) or a
    run_pipeline that composes the stages differently from MTIPSolver: both give bitwise
    identical density, orientations and half maps."""
    algo = dict(TINY_ALGORITHM, generations=2, match_resolution_ramp=1)
    cfg = tiny_config(tiny, tmp_path / "out", algo, validation)
    run_pipeline(cfg, ParallelContext.serial())
    problem = Problem.open(cfg, ParallelContext.serial()).load()
    solver = MTIPSolver(problem, SolverState.initial(problem))
    solver.evolve()
    st = solver.state
    with h5py.File(tmp_path / "out" / "checkpoint.h5") as f:
        assert int(f.attrs["generation"]) == st.generation == 1
        np.testing.assert_array_equal(f["density"][()], st.full.density)
        np.testing.assert_array_equal(f["phased_ac"][()], st.full.phased_ac)
        np.testing.assert_array_equal(f["orientations"][()], st.orientations)
        np.testing.assert_array_equal(f["match_index"][()], st.match_index)
        if validation:
            np.testing.assert_array_equal(f["half_density"][()],
                                          np.stack([h.density for h in st.halves]))
    if validation:
        import json

        doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert doc["generations"][-1]["half_set"]["mode"] == "independent"
    with h5py.File(tmp_path / "out" / "result.h5") as f:
        np.testing.assert_array_equal(f["density"][()], st.full.density.astype(np.float32))
