"""Validation without ground truth: half-set split and FSC, PRTF, progress.png."""

import json

import h5py
import numpy as np
import pytest

from helpers import TINY_ALGORITHM, simulate_tiny, tiny_config
from spinifel.config import load_config
from spinifel.evaluate.align import mirror
from spinifel.parallel.context import ParallelContext
from spinifel.pipeline import run_pipeline
from spinifel.validation.halves import half_assignment, half_map_fsc
from spinifel.validation.prtf import PRTF_THRESHOLD, align_runs, prtf_curve, prtf_summary


def _blob(m, rng, n=6, width=1.5):
    """A compact positive object: a few Gaussians within the central third of the grid."""
    k = np.arange(m) - (m - 1) / 2
    x, y, z = np.meshgrid(k, k, k, indexing="ij")
    rho = np.zeros((m, m, m))
    for c in rng.uniform(-m / 6, m / 6, size=(n, 3)):
        rho += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * width**2))
    return rho


# ------------------------------------------------------------------ half sets ---------

def test_half_assignment_is_balanced_seeded_and_not_parity():
    h = half_assignment(101, seed=7)
    assert h.dtype == np.int8 and h.shape == (101,)
    assert int(h.sum()) == 50
    assert np.array_equal(h, half_assignment(101, seed=7))
    assert not np.array_equal(h, half_assignment(101, seed=8))
    # a random split, not odd/even by index
    assert not np.array_equal(h, np.arange(101) % 2)
    with pytest.raises(ValueError):
        half_assignment(1, 0)


def test_half_map_fsc_undoes_shift_and_hand(rng):
    m = 21
    a = _blob(m, rng)
    b = np.roll(mirror(a), (2, -1, 3), axis=(0, 1, 2))
    out = half_map_fsc(a, b, voxel_size_angstrom=2.0)
    assert out["hand"] == "mirrored"
    assert out["correlation"] > 1 - 1e-9
    fsc = np.array(out["fsc"], dtype=float)
    assert np.nanmin(fsc) > 1 - 1e-9
    # never crosses: no resolution, "better than" the finest shell 1 / ((m // 2) / (m d))
    # (the old code reported that shell as the resolution)
    assert out["resolution_0p143_angstrom"] is None and out["resolution_0p143_reached"] is False
    assert out["resolution_0p143_better_than_angstrom"] == pytest.approx(m * 2.0 / (m // 2))


def test_half_map_fsc_of_independent_noise_crosses_early(rng):
    m = 21
    a, b = rng.random((m, m, m)), rng.random((m, m, m))
    out = half_map_fsc(a, b, 2.0)
    fsc = np.array(out["fsc"], dtype=float)
    # beyond shell 0 (the mean) the expected FSC of independent noise is 0 with standard
    # deviation 1/sqrt(n_shell_voxels); shell 1 has 18+ voxels
    assert np.nanmax(np.abs(fsc[2:])) < 0.6
    assert out["resolution_0p143_reached"] is True
    assert out["resolution_0p143_angstrom"] > 2 * 2.0 * m / (m // 2)


# ---------------------------------------------------------------------- PRTF ----------

def _prtf_brute(runs, d, mask=None):
    """Per-voxel PRTF averaged over shells with explicit loops (independent reference)."""
    m = runs[0].shape[0]
    f = [np.fft.fftn(r) for r in runs]
    n_sh = m // 2 + 1
    tot, cnt = np.zeros(n_sh), np.zeros(n_sh)
    amax = max(np.abs(x).mean() for x in [np.mean([abs(ff) for ff in f], axis=0)])
    den_all = np.mean([np.abs(ff) for ff in f], axis=0)
    for i in range(m):
        for j in range(m):
            for k in range(m):
                # frequency index of fftn order, signed
                fi, fj, fk = [(v if v <= m // 2 else v - m) for v in (i, j, k)]
                sh = int(round(np.sqrt(fi * fi + fj * fj + fk * fk)))
                den = den_all[i, j, k]
                if sh >= n_sh or den <= 1e-12 * den_all.max():
                    continue
                if mask is not None and not mask[(fi + m // 2), (fj + m // 2), (fk + m // 2)]:
                    continue
                num = abs(sum(ff[i, j, k] for ff in f) / len(f))
                tot[sh] += num / den
                cnt[sh] += 1
    del amax
    return np.arange(n_sh) / (m * d), np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def test_prtf_matches_brute_force(rng):
    m = 9
    runs = [rng.random((m, m, m)) for _ in range(4)]
    mask = rng.random((m, m, m)) > 0.3
    mask = mask & mask[::-1, ::-1, ::-1]
    for msk in (None, mask):
        f_ref, c_ref = _prtf_brute(runs, 1.5, msk)
        f, c = prtf_curve(runs, 1.5, msk)
        assert np.allclose(f, f_ref, rtol=1e-15)
        ok = np.isfinite(c_ref)
        assert np.array_equal(ok, np.isfinite(c))
        assert np.allclose(c[ok], c_ref[ok], rtol=1e-12, atol=1e-14)


def test_prtf_is_one_for_identical_phases_and_low_for_random_phases(rng):
    m = 15
    obj = _blob(m, rng)
    _, c = prtf_curve([obj, 2.0 * obj, 0.5 * obj], 1.0)
    assert np.nanmin(c) > 1 - 1e-9
    # K runs with independent uniform phases and equal amplitudes: E|mean phasor| is about
    # sqrt(pi / (4 K)) = 0.31 for K = 8 (Rayleigh); far below 1/e is the point
    amp = np.abs(np.fft.fftn(obj))
    runs = []
    for _ in range(8):
        ph = np.exp(2j * np.pi * rng.random((m, m, m)))
        runs.append(np.fft.ifftn(amp * ph).real)
    _, c_rand = prtf_curve(runs, 1.0)
    assert np.nanmean(c_rand[2:]) < PRTF_THRESHOLD


@pytest.mark.parametrize("k", [3, 4, 8])
def test_prtf_of_unrelated_volumes_gives_no_resolution(k, rng):
    """K unrelated random volumes (K = 4 as in examples/beamline.toml) must not resolve.

    Their PRTF is about sqrt(pi / 4K) (0.44 for K = 4, above 1/e) and alignment raises it;
    the old 1/e cut-off then reported a "resolution" at Nyquist. Against the measured
    random-phase floor no shell beyond the first is above the threshold.
    """
    m = 21
    runs = [rng.normal(size=(m, m, m)) for _ in range(k)]
    summary, _ = prtf_summary(runs, 2.0)
    assert summary["resolution_angstrom"] is None
    assert summary["resolution_1_over_e_angstrom"] is None
    assert summary["status"] == "below floor"
    # the floor itself is the random-phase level, not 1/e
    floor = np.array([np.nan if v is None else v for v in summary["floor"]])
    assert np.nanmedian(floor[2:]) > 0.8 * np.sqrt(np.pi / (4 * k))


def test_prtf_of_a_structure_with_phase_noise_resolves(rng):
    """Runs of one structure whose phase noise grows with resolution: a crossing is found
    between the agreeing low shells and the random high shells (and small uniform noise
    is "not reached": better than the finest shell)."""
    m = 21
    obj = _blob(m, rng, width=1.0)
    f = np.fft.fftn(obj)
    kk = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.fft.fftfreq(m)] * 3, indexing="ij")))
    kfrac = kk / kk.max()
    grow = [np.fft.ifftn(f * np.exp(1j * rng.normal(size=f.shape) * 6.0 * kfrac**2)).real
            for _ in range(4)]
    summary, _ = prtf_summary(grow, 2.0)
    assert summary["status"] == "crossed"
    nyq = 1 / summary["freq_inv_angstrom"][-1]
    assert nyq < summary["resolution_angstrom"] < 1 / summary["freq_inv_angstrom"][2]
    small = [np.fft.ifftn(f * np.exp(0.2j * rng.normal(size=f.shape))).real for _ in range(4)]
    summary, _ = prtf_summary(small, 2.0)
    assert summary["status"] == "not reached" and summary["resolution_angstrom"] is None
    assert summary["better_than_angstrom"] == pytest.approx(nyq)


def test_prtf_summary_aligns_shifted_and_mirrored_runs(rng):
    m = 21
    obj = _blob(m, rng)
    runs = [obj, np.roll(obj, (3, 0, -2), axis=(0, 1, 2)), np.roll(mirror(obj), (1, 1, 1), (0, 1, 2))]
    aligned, hands = align_runs(runs)
    assert hands == ["same", "same", "mirrored"]
    for a in aligned:
        assert np.allclose(a, obj, atol=1e-9 * obj.max())
    summary, avg = prtf_summary(runs, 2.0)
    assert summary["n_runs"] == 3
    assert min(v for v in summary["prtf"] if v is not None) > 1 - 1e-9
    assert np.allclose(avg, obj, atol=1e-9 * obj.max())


# ------------------------------------------------------------------ pipeline ----------

TINY = {"algorithm": dict(TINY_ALGORITHM, generations=2)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return simulate_tiny(tmp_path_factory.mktemp("data") / "tiny.h5", 120)


def _cfg(path, out, validation=None, **algo):
    return tiny_config(path, out, dict(TINY["algorithm"], **algo), validation)


def test_half_sets_do_not_change_the_full_merge(tiny, tmp_path):
    """The full set's equations are the sum of the halves': generation 0 agrees to round-off."""
    for name, val in (("plain", None), ("halves", {"half_sets": "shared"})):
        run_pipeline(_cfg(tiny, tmp_path / name, val, generations=1), ParallelContext.serial())
    with h5py.File(tmp_path / "plain" / "checkpoint.h5") as f0, \
            h5py.File(tmp_path / "halves" / "checkpoint.h5") as f1:
        a, b = f0["merged_ac"][()], f1["merged_ac"][()]
        assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max()
        assert f1["half_density"].shape == (2, 25, 25, 25)
        assert "half_density" not in f0
    doc = json.loads((tmp_path / "halves" / "metrics.json").read_text())
    hs = doc["generations"][0]["half_set"]
    assert len(hs["fsc"]) == 25 // 2 + 1 and hs["hand"] in ("same", "mirrored")
    assert (hs["resolution_0p143_angstrom"] is None) == (not hs["resolution_0p143_reached"])
    assert (tmp_path / "halves" / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prtf_runs_write_summary_and_average_density(tiny, tmp_path):
    out = tmp_path / "prtf"
    run_pipeline(_cfg(tiny, out, {"half_sets": "shared", "prtf_runs": 3}), ParallelContext.serial())
    doc = json.loads((out / "metrics.json").read_text())
    p = doc["prtf"]
    assert p["n_runs"] == 3 and len(p["prtf"]) == 25 // 2 + 1
    vals = [v for v in p["prtf"] if v is not None]
    # shells inside the beamstop are not measured (None); the rest are in [0, 1], with the
    # lowest measured shell's phases reproducible
    assert p["prtf"][0] is None and 0 <= min(vals) and max(vals) <= 1 + 1e-12
    assert vals[0] > PRTF_THRESHOLD
    assert p["status"] in ("crossed", "not reached", "below floor")
    assert (p["resolution_angstrom"] is None) == (p["status"] != "crossed")
    assert all(t is None or t >= PRTF_THRESHOLD for t in p["threshold"])
    assert all("half_set" in g for g in doc["generations"])
    with h5py.File(out / "result.h5") as f:
        dens = f["density"][()]
    assert dens.min() >= 0 and dens.max() > 0
    assert (out / "progress.png").stat().st_size > 10_000


def test_progress_png_can_be_switched_off(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "o", generations=1)
    from dataclasses import replace

    cfg = replace(cfg, output=replace(cfg.output, progress_png=False))
    run_pipeline(cfg, ParallelContext.serial())
    assert not (tmp_path / "o" / "progress.png").exists()


def test_bad_prtf_runs_is_a_config_error():
    from spinifel.errors import ConfigError

    with pytest.raises(ConfigError, match="validation.prtf_runs"):
        load_config(None, (), {"validation": {"prtf_runs": 1}})


def test_half_sets_and_prtf_on_one_and_two_ranks(tiny, tmp_path):
    """The half split and the PRTF seeds do not depend on the rank count."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec beside this python")
    ck = {}
    for n in (1, 2):
        out = tmp_path / f"np{n}"
        cmd = [str(mpiexec), "-n", str(n), sys.executable, "-m", "spinifel", "run", "--out",
               str(out), "--set", f"data.path={tiny}", "--set", "validation.half_sets=shared",
               "--set", "validation.prtf_runs=3", "--set", "algorithm.generations=1"]
        for k, v in TINY["algorithm"].items():
            if k != "generations":
                cmd += ["--set", f"algorithm.{k}={json.dumps(v)}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        with h5py.File(out / "checkpoint.h5") as f:
            ck[n] = {k: f[k][()] for k in ("merged_ac", "half_merged_ac")}
        doc = json.loads((out / "metrics.json").read_text())
        assert doc["prtf"]["n_runs"] == 3 and "half_set" in doc["generations"][0]
    for k in ("merged_ac", "half_merged_ac"):
        a, b = ck[1][k], ck[2][k]
        assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max(), k


def test_eta_uses_recent_generations_and_measured_refinement():
    from spinifel.pipeline import estimate_remaining

    # 3 generations of 10 s, refinement from generation 8 of 10 not measured yet
    eta, complete = estimate_remaining([(10.0, 0.0)] * 3, 2, 10, 8)
    assert eta == pytest.approx(70.0) and not complete
    # the last two generations set the base (the first one was slower)
    eta, complete = estimate_remaining([(30.0, 0.0), (12.0, 0.0), (8.0, 0.0)], 2, 5, 5)
    assert eta == pytest.approx(20.0) and complete
    # refinement measured (50 s of a 60 s generation): base 10 s, + 50 s per refine generation
    eta, complete = estimate_remaining([(10.0, 0.0), (60.0, 50.0)], 8, 10, 8)
    assert eta == pytest.approx(10.0 + 50.0) and complete
    # before refinement is measured, a prediction (from the slicing rate) fills in
    eta, complete = estimate_remaining([(10.0, 0.0)] * 3, 2, 10, 8, refine_guess=30.0)
    assert eta == pytest.approx(70.0 + 2 * 30.0) and complete


def test_independent_half_sets_match_each_half_against_its_own_map(tiny, tmp_path):
    """Generation 2 in "independent" mode: each image's grid match is the nearest slice of
    its own half map (checked with a direct match against the checkpointed half maps)."""
    from spinifel.geometry.orientations import orientation_grid
    from spinifel.io.dataset import read_geometry, read_shard
    from spinifel.orientation.matching import match_orientations
    from spinifel.orientation.slicing import Slicer
    from spinifel.validation.halves import half_assignment

    algo = {"match_resolution_ramp": 2, "refine_rounds": 0}
    out = tmp_path / "ind"
    run_pipeline(_cfg(tiny, out, {"half_sets": "independent"}, generations=2, **algo),
                 ParallelContext.serial())
    with h5py.File(out / "checkpoint.h5") as f:
        half_models = f["half_phased_ac"][()]
        full_model = f["phased_ac"][()]
    run_pipeline(_cfg(tiny, out, {"half_sets": "independent"}, generations=3, **algo),
                 ParallelContext.serial(), resume=True)
    with h5py.File(out / "checkpoint.h5") as f:
        got = f["match_index"][()]
    cfg = _cfg(tiny, out, generations=3, **algo)
    a = cfg.algorithm
    geom = read_geometry(tiny)
    images = read_shard(tiny, 0, 120, 0, 0, "error", geom).images[:, geom.mask].astype(np.float32)
    pos = geom.positions[:, geom.mask]
    grid = orientation_grid(a.n_orientations)
    halves = half_assignment(120, cfg.runtime.seed)
    expect = np.empty(120, dtype=np.int64)
    for h in (0, 1):
        sl = Slicer(half_models[h], pos, geom.reciprocal_extent, a.nufft_eps_slicing, np.float32)
        st = match_orientations(images[halves == h], sl.iter_batches(grid, a.orientation_batch),
                                a.scale_per_image, a.image_batch, a.match_transform)
        expect[halves == h] = st.best_index
    assert np.array_equal(got, expect)
    # and it is not what matching against the full map gives
    sl = Slicer(full_model, pos, geom.reciprocal_extent, a.nufft_eps_slicing, np.float32)
    shared = match_orientations(images, sl.iter_batches(grid, a.orientation_batch),
                                a.scale_per_image, a.image_batch, a.match_transform).best_index
    assert not np.array_equal(got, shared)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["generations"][2]["half_set"]["mode"] == "independent"


def test_independent_half_sets_ring_equals_replicated_on_two_ranks(tiny, tmp_path):
    """Independent half matching calls the ring collective once per half (uneven subsets
    per rank): the result is bitwise the replicated one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec beside this python")
    res = {}
    for mode in ("replicated", "distributed"):
        out = tmp_path / mode
        cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "spinifel", "run", "--out",
               str(out), "--set", f"data.path={tiny}", "--set", "validation.half_sets=independent",
               "--set", f"algorithm.matching_mode={mode}", "--set", "algorithm.generations=3",
               "--set", "algorithm.match_resolution_ramp=2"]
        for k, v in TINY["algorithm"].items():
            if k != "generations":
                cmd += ["--set", f"algorithm.{k}={json.dumps(v)}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        with h5py.File(out / "result.h5") as f:
            res[mode] = {k: f[k][()] for k in ("orientations", "density")}
    for k in ("orientations", "density"):
        assert np.array_equal(res["replicated"][k], res["distributed"][k]), k
