"""The whole generation loop on a tiny simulated dataset, serially and on 1 vs 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import SMALL_ALGORITHM, TINY_ALGORITHM, simulate_small, simulate_tiny, tiny_config
from spinifel.parallel.context import ParallelContext
from spinifel.pipeline import intensity_from_autocorrelation, measured_fourier_mask, run_pipeline

BIN = Path(sys.executable).parent
TINY = {"algorithm": dict(TINY_ALGORITHM, generations=3)}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return simulate_tiny(tmp_path_factory.mktemp("data") / "tiny.h5", 200)


def _config(path, out, **algo):
    return tiny_config(path, out, dict(TINY["algorithm"], **algo))


def test_serial_run_writes_consistent_results(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    plan = run_pipeline(_config(tiny_dataset, out), ParallelContext.serial(), dry_run=True)
    summary = run_pipeline(_config(tiny_dataset, out), ParallelContext.serial())
    assert summary["generations"] == 3
    with h5py.File(out / "result.h5") as f:
        ac = f["autocorrelation"][()]
        intensity = f["intensity"][()]
        q = f["orientations"][()]
        assert f["density"].shape == (25, 25, 25) and f["density"].dtype == np.float32
        assert f.attrs["generation"] == 2 and f.attrs["n_ranks"] == 1
        assert "[algorithm]" in f.attrs["config"]
    # every input image has a unit quaternion, in file order
    assert q.shape == (200, 4)
    assert np.allclose(np.linalg.norm(q, axis=1), 1)
    # the written intensity is the transform of the written autocorrelation
    ref = intensity_from_autocorrelation(ac.astype(np.float64))
    assert np.abs(intensity - ref).max() <= 1e-5 * np.abs(ref).max()
    metrics = json.loads((out / "metrics.json").read_text())
    gens = metrics["generations"]
    assert [g["generation"] for g in gens] == [0, 1, 2]
    assert {"merge_nufft", "merge_cg", "phasing"} <= set(gens[0]["timings"])
    assert {"slicing", "matching", "refinement"} <= set(gens[2]["timings"])
    # every generation is evaluated against the truth (the quality threshold itself is
    # test_reconstructs_from_random_orientations: this tiny problem does not converge)
    assert all("density_correlation" in g["evaluation"] for g in gens)
    # the memory estimate the run was judged by, next to the peak RSS it reached
    mem = metrics["memory"]
    assert mem["estimate_per_rank_mib"] == [plan["memory_per_rank_bytes"] / 2**20]
    assert mem["peak_rss_per_rank_mib"] == gens[-1]["peak_rss_mib"]
    assert mem["peak_over_estimate"] == pytest.approx(
        max(gens[-1]["peak_rss_mib"]) / mem["estimate_max_mib"], rel=1e-12)
    assert (out / "density.mrc").exists() and (out / "intensity.mrc").exists()
    assert not list(out.glob("*.tmp*"))


def test_true_orientations_mode_reconstructs(tiny_dataset, tmp_path):
    """With the true orientations the merge + phasing must reach a good density."""
    out = tmp_path / "known"
    summary = run_pipeline(_config(tiny_dataset, out, use_true_orientations=True, generations=1,
                                   n_phase_loops=6, n_er=30, n_hio=30, n_final_er=30),
                           ParallelContext.serial())
    ev = summary["evaluation"]
    # The merge with known orientations recovers the 3D intensity; phasing this tiny,
    # sparsely sampled case lands between 0.59 and 0.90 depending on round-off (thread
    # count, iteration count), and an unrelated density scores below 0.45: assert above
    # that, and the tight claims on realistic data live in docs/results.md.
    assert ev["intensity_correlation"] > 0.9  # measured 0.93 (sparse: 200 images of 16x16)
    assert ev["density_correlation"] > 0.5
    assert ev["orientation_error_deg"]["median"] == pytest.approx(0.0, abs=1e-6)


def test_reconstructs_from_random_orientations(tmp_path):
    """End to end from random orientations: the matching must find the orientations.

    Catches a broken orientation stage (matching, slicing, refinement or the model they
    match against). Measured on the small problem (tests/helpers.py, SMALL_*), one BLAS
    thread, runtime.seed 0-5: density correlation 0.887, 0.857, 0.762, 0.765, 0.800, 0.891
    and median orientation error 1.18, 1.34, 1.48, 1.21, 2.68, 1.29 deg after 10
    generations (grid spacing 18.1 deg). With the grid matches replaced by random indices,
    or all by index 0 (monkeypatched ``spinifel.pipeline.solver.match_orientations``), this
    test failed: correlation 0.527 / 0.511, median error 127.6 / 127.5 deg (generation 0,
    random orientations, already scores 0.54-0.58). The thresholds sit between the two,
    0.08 below the worst seed's correlation.
    """
    from threadpoolctl import threadpool_limits

    data = simulate_small(tmp_path / "small.h5")
    with threadpool_limits(1):  # one BLAS thread, as measured (and as `run` sets by default)
        summary = run_pipeline(tiny_config(data, tmp_path / "out", SMALL_ALGORITHM),
                               ParallelContext.serial())
    ev = summary["evaluation"]
    assert ev["orientation_error_deg"]["median"] < 6.0
    assert ev["density_correlation"] > 0.68


def test_fourier_mask_is_the_measured_shell():
    s = np.array([[0.1, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]).T
    m = measured_fourier_mask(21, s, 1.0)
    c = 10
    step = 2.0 / 21
    assert m[c + int(0.5 / step), c, c] and not m[c, c, c]  # beamstop hole at the centre
    assert not m[0, 0, 0]  # cube corner beyond the detector's reach
    assert np.array_equal(m, m[::-1, ::-1, ::-1])  # centrosymmetric


def test_dry_run_prints_plan(tiny_dataset, tmp_path):
    plan = run_pipeline(_config(tiny_dataset, tmp_path / "dry"), ParallelContext.serial(), dry_run=True)
    assert plan["n_images"] == 200 and plan["ranks"] == 1
    assert plan["memory_per_rank_bytes"] > 0
    assert not (tmp_path / "dry").exists()


@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="no mpiexec beside this python")
def test_one_and_two_ranks_agree(tiny_dataset, tmp_path):
    """Same seed: orientations identical and autocorrelation equal to round-off on 1 and 2 ranks."""
    results = {}
    for n, mode in ((1, "replicated"), (2, "replicated"), ("2d", "distributed")):
        out = tmp_path / f"np{n}"
        cmd = [str(BIN / "mpiexec"), "-n", str(n)[0], sys.executable, "-m", "spinifel", "run",
               "--out", str(out), "--set", f"data.path={tiny_dataset}",
               "--set", f"algorithm.matching_mode={mode}"]
        for sec, vals in TINY.items():
            for k, v in vals.items():
                cmd += ["--set", f"{sec}.{k}={json.dumps(v)}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        with h5py.File(out / "result.h5") as f:
            results[n] = {k: f[k][()] for k in ("orientations", "autocorrelation", "density")}
            assert f.attrs["n_ranks"] == int(str(n)[0])
        with h5py.File(out / "checkpoint.h5") as f:
            results[n]["match_index"] = f["match_index"][()]
        m = json.loads((out / "metrics.json").read_text())
        results[n]["lambda"] = [g["lambda_rel"] for g in m["generations"]]
    # ring-distributed matching gives exactly the replicated result on the same ranks
    for k in ("orientations", "autocorrelation", "density", "match_index"):
        assert np.array_equal(results[2][k], results["2d"][k]), k
    a, b = results[1], results[2]
    from spinifel.geometry.orientations import angle_between

    # the grid match of the last generation (before the off-grid refinement)
    same = a["match_index"] == b["match_index"]
    diff_deg = np.degrees(angle_between(a["orientations"], b["orientations"]))
    scale = np.abs(a["autocorrelation"]).max()
    print("identical grid matches:", same.mean(), "refined angle differences (deg) median/p90",
          np.median(diff_deg), np.quantile(diff_deg, 0.9), "lambda", a["lambda"], b["lambda"],
          "ac diff", np.abs(a["autocorrelation"] - b["autocorrelation"]).max() / scale)
    # Each stage is rank-independent to round-off (tests/test_merge.py, test_matching.py);
    # over generations the iterative phasing amplifies round-off a little, so a few
    # near-tie images may take a neighbouring grid orientation, and the continuous
    # (parabolic) refinement moves by a fraction of a degree with the model. Measured:
    # 96% identical grid matches after three generations, refined orientations within
    # 0.3 deg (median) / 1.5 deg (p90) on this 16x16-pixel case (grid spacing 35 deg),
    # autocorrelations within 1%, densities correlated 0.92.
    assert a["lambda"] == b["lambda"]
    assert same.mean() >= 0.9
    assert np.median(diff_deg) < 1.0 and np.quantile(diff_deg, 0.9) < 5.0
    assert np.abs(a["autocorrelation"] - b["autocorrelation"]).max() < 0.03 * scale
    assert np.corrcoef(a["density"].ravel(), b["density"].ravel())[0, 1] > 0.85
