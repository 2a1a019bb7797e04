"""Tests of spinifel.evaluate: global rotation, alignment, FSC, rotation search, report, CLI.

The test object is a few Gaussian blobs of different heights (non-centrosymmetric),
rendered analytically on the grid, so rotated/mirrored/shifted copies are exact and
independent of the code under test. Intensities follow the architecture's convention
``|fftshift(fftn(ifftshift(rho)))|^2``.
"""

from __future__ import annotations

import argparse
import json
import math

import h5py
import numpy as np
import pytest

from spinifel.commands import evaluate as cmd
from spinifel.errors import DatasetError, OutputError, SpinifelError
from spinifel.evaluate.align import align_density, rotate_volume, search_rotation
from spinifel.evaluate.fsc import (
    crossing,
    describe_resolution,
    fsc,
    intensity_shell_correlation,
    pearson,
    resolution_at,
)
from spinifel.evaluate.orientations import global_rotation, orientation_errors
from spinifel.evaluate.report import (
    GroundTruth,
    evaluate_arrays,
    evaluate_result,
    load_ground_truth,
)
from spinifel.geometry import orientations as quat

M = 25
D = 3.0  # angstrom
SIGMA = 1.3  # voxels
EPS = np.finfo(np.float64).eps


def blobs(pos: np.ndarray, amp: np.ndarray, m: int = M, sigma: float = SIGMA) -> np.ndarray:
    """Sum of isotropic Gaussians at centred positions ``pos`` (n, 3), voxel units."""
    k = np.arange(m) - (m - 1) / 2.0
    x, y, z = np.meshgrid(k, k, k, indexing="ij")
    out = np.zeros((m, m, m))
    for p, a in zip(pos, amp):
        out += a * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma**2))
    return out


def intensity_of(rho: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rho)))) ** 2


def analytic_intensity(pos: np.ndarray, amp: np.ndarray, s: np.ndarray) -> np.ndarray:
    """|F|^2 of the blob density at reciprocal points s (3, n), voxel^-1 units."""
    phase = np.exp(-2j * np.pi * (pos @ s))  # (n_blobs, n)
    f = (amp[:, None] * phase).sum(axis=0) * np.exp(-2 * np.pi**2 * SIGMA**2 * np.sum(s * s, 0))
    return np.abs(f) ** 2


@pytest.fixture
def molecule() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    pos = rng.uniform(-4.5, 4.5, size=(6, 3))
    amp = rng.uniform(0.5, 1.5, size=6)
    return pos, amp


def make_truth(pos, amp, q=None) -> GroundTruth:
    rho = blobs(pos, amp)
    return GroundTruth(density=rho.astype(np.float32),
                       intensity=intensity_of(rho).astype(np.float32),
                       orientations=q, voxel_size_angstrom=D, name="blobs")


def random_rotation(seed: int) -> np.ndarray:
    return quat.quaternion_to_matrix(quat.random_quaternions(1, np.random.default_rng(seed)))[0]


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Rotation angle of a^T b from its axis-angle form (accurate near zero, unlike acos)."""
    m = a.T @ b
    sin_half = 0.5 * np.linalg.norm([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    cos_half = 0.5 * (np.trace(m) + 1)
    return math.degrees(math.atan2(sin_half, cos_half))


# ------------------------------------------------------------------------- FSC ---

def test_fsc_of_volume_with_itself_is_one(molecule):
    rho = blobs(*molecule)
    freq, c = fsc(rho, rho, D)
    assert freq.shape == (M // 2 + 1,)
    np.testing.assert_allclose(freq, np.arange(M // 2 + 1) / (M * D), rtol=1e-15)
    np.testing.assert_allclose(c, 1.0, atol=100 * EPS)
    assert resolution_at(freq, c, 0.143, nyquist_angstrom=2 * D) == 2 * D
    assert resolution_at(freq, c, 0.5) == pytest.approx(1 / freq[-1], rel=1e-15)


def test_fsc_matches_direct_sum():
    m, d = 7, 1.5
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, m, m, m))
    freq, c = fsc(a, b, d)
    # Brute force: explicit DFT and shell sums over integer frequency triples.
    k = np.arange(m) - m // 2
    lin = np.arange(m)
    num = np.zeros(m // 2 + 1)
    pa = np.zeros_like(num)
    pb = np.zeros_like(num)
    for kx in k:
        for ky in k:
            for kz in k:
                shell = int(round(math.sqrt(kx * kx + ky * ky + kz * kz)))
                if shell > m // 2:
                    continue
                e = np.exp(-2j * np.pi * (kx * lin[:, None, None] + ky * lin[None, :, None]
                                          + kz * lin[None, None, :]) / m)
                fa, fb = np.sum(a * e), np.sum(b * e)
                num[shell] += (fa * np.conj(fb)).real
                pa[shell] += abs(fa) ** 2
                pb[shell] += abs(fb) ** 2
    np.testing.assert_allclose(c, num / np.sqrt(pa * pb), atol=1e3 * EPS)
    np.testing.assert_allclose(freq, np.arange(m // 2 + 1) / (m * d))


def test_crossing_reports_not_reached_and_below():
    """crossing(): the interpolated first crossing, and no value when there is none.

    Catches reporting the finest shell (or the first) as a resolution when the curve never
    crosses (or never is above) the threshold.
    """
    freq = np.arange(11) / 20.0
    curve = 1.0 - np.arange(11) / 10.0  # crosses 0.5 between shells 5 and 6 -> f = 0.25
    assert crossing(freq, curve, 0.5) == (pytest.approx(4.0, rel=1e-12), "crossed",
                                          pytest.approx(2.0))
    # per-shell threshold: crossing of curve - threshold
    thr = np.full(11, 0.3)
    thr[8:] = 0.9
    r, status, _ = crossing(freq, np.full(11, 0.8), thr)
    assert status == "crossed" and r == pytest.approx(1 / (freq[7] + 0.05 * 0.5 / 0.6))
    assert crossing(freq, np.ones(11), 0.5) == (None, "not reached", pytest.approx(2.0))
    assert crossing(freq, np.zeros(11), 0.5) == (None, "below", pytest.approx(2.0))
    assert crossing(freq, np.full(11, np.nan), 0.5) == (None, "empty", None)


def test_resolution_at_known_crossing():
    freq = np.linspace(0.0, 0.5, 11)
    curve = 1.0 - 2.0 * freq  # crosses 0.5 at f = 0.25 and 0.143 at f = 0.4285
    assert resolution_at(freq, curve, 0.5) == pytest.approx(4.0, rel=1e-12)
    assert resolution_at(freq, curve, 0.143) == pytest.approx(1 / ((1 - 0.143) / 2), rel=1e-12)
    with_nan = curve.copy()
    with_nan[[2, 6]] = np.nan  # skipped: the crossing interpolates between 0.2 and 0.35
    r = resolution_at(freq, with_nan, 0.5)
    assert r == pytest.approx(1 / (0.2 + (0.5 - 0.6) * 0.15 / (0.3 - 0.6)), rel=1e-12)
    assert resolution_at(freq, np.ones(11), 0.5) == pytest.approx(2.0)
    assert resolution_at(freq, np.ones(11), 0.5, nyquist_angstrom=1.9) == 1.9
    assert math.isnan(resolution_at(freq, np.full(11, np.nan), 0.5))
    assert resolution_at(freq, np.zeros(11), 0.5) == math.inf


def test_pearson_and_intensity_shell_correlation(molecule):
    rho = blobs(*molecule)
    assert pearson(rho, 3 * rho + 1) == pytest.approx(1.0, abs=1e-12)
    assert pearson(rho, -rho) == pytest.approx(-1.0, abs=1e-12)
    inten = intensity_of(rho)
    f, c = intensity_shell_correlation(inten, 2 * inten, D)
    assert math.isnan(c[0])  # a single voxel has no correlation
    np.testing.assert_allclose(c[1:], 1.0, atol=1e-9)


# ------------------------------------------------------------- orientations ---

def test_global_rotation_with_outliers():
    rng = np.random.default_rng(5)
    g = random_rotation(11)
    q_true = quat.random_quaternions(600, rng)
    qg = quat.matrix_to_quaternion(g)
    q_rec = quat.multiply(quat.conjugate(qg), q_true)  # R_rec = G^T R_true
    bad = rng.choice(600, size=240, replace=False)  # 40 % wrong orientations
    q_rec[bad] = quat.random_quaternions(240, rng)
    q_rec[::2] *= -1  # q and -q are one rotation
    g_fit, info = global_rotation(q_true, q_rec)
    assert info["convention"] == "direct"
    assert angle_deg(g_fit, g) < 1e-6
    err = orientation_errors(q_true, q_rec, g_fit)
    good = np.setdiff1d(np.arange(600), bad)
    assert np.max(err[good]) < 1e-5
    assert np.median(err[bad]) > 30
    assert info["n_inliers"] >= 360


def test_global_rotation_transposed_convention():
    rng = np.random.default_rng(6)
    g = random_rotation(12)
    q_true = quat.random_quaternions(200, rng)
    q_rec = quat.multiply(quat.conjugate(quat.matrix_to_quaternion(g)), q_true)
    stored = quat.conjugate(q_true)[:, None, :]  # another simulator stores R^T, shape (N,1,4)
    g_fit, info = global_rotation(stored, q_rec)
    assert info["convention"] == "transposed"
    assert angle_deg(g_fit, g) < 1e-6
    assert info["median_error_deg_direct"] > 10
    assert np.max(orientation_errors(stored, q_rec, g_fit, "transposed")) < 1e-5


def test_orientation_errors_known_angle():
    q = quat.random_quaternions(50, np.random.default_rng(3))
    tilt = quat.matrix_to_quaternion(np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0.0]]))  # 90 deg
    err = orientation_errors(q, quat.multiply(q, tilt), np.eye(3))
    np.testing.assert_allclose(err, 90.0, atol=1e-9)


# -------------------------------------------------------------------- volumes ---

def test_rotate_volume_moves_a_point_to_r_p():
    p = np.array([[3.0, -1.0, 2.0]])
    r = random_rotation(21)
    out = rotate_volume(blobs(p, np.ones(1)), r)
    k = np.arange(M) - (M - 1) / 2.0
    grid = np.stack(np.meshgrid(k, k, k, indexing="ij"))
    centroid = (grid * out).reshape(3, -1).sum(1) / out.sum()
    np.testing.assert_allclose(centroid, r @ p[0], atol=0.02)


def test_rotated_reconstruction_lands_in_truth_frame(molecule):
    pos, amp = molecule
    g = random_rotation(22)
    truth = blobs(pos, amp)
    rec = blobs(pos @ g, amp)  # rec(r) = truth(G r): blob p appears at G^T p
    out = rotate_volume(rec, g)
    assert pearson(out, truth) > 0.999
    assert np.max(np.abs(out - truth)) < 0.03 * truth.max()


def test_align_density_recovers_mirror_and_shift(molecule):
    pos, amp = molecule
    truth = blobs(pos, amp)
    t = np.array([2.0, -1.0, 3.0])
    moving = 0.5 * blobs(-pos + t, amp)  # mirrored, shifted, scaled
    aligned, info = align_density(moving, truth)
    assert info["hand"] == "mirrored"
    np.testing.assert_allclose(info["shift"], t, atol=1e-6)
    assert info["scale"] == pytest.approx(2.0, rel=1e-6)
    # Blob tails cut at the grid edge wrap around under the circular shift: 1e-4 of max.
    np.testing.assert_allclose(aligned, truth, atol=1e-4 * truth.max())
    # Sub-voxel shifts are recovered by the parabolic peak + Fourier shift.
    _, info2 = align_density(blobs(pos + [0.4, 0.0, -0.3], amp), truth)
    assert info2["hand"] == "same"
    np.testing.assert_allclose(info2["shift"], [-0.4, 0.0, 0.3], atol=0.1)
    assert info2["correlation"] > 0.999


# ------------------------------------------------------------------ pipeline ---

def rotated_mirrored_shifted(pos, amp, g, t):
    """Reconstruction in another frame: rec(r) = truth(-G (r - t)), i.e. blobs at -G^T p + t."""
    rho = blobs(-(pos @ g) + t, amp)
    return rho, intensity_of(rho)


def test_evaluate_truth_against_itself(molecule):
    q = quat.random_quaternions(300, np.random.default_rng(8))
    truth = make_truth(*molecule, q=q)
    ev = evaluate_arrays(density=truth.density, intensity=truth.intensity, orientations=q,
                         voxel_size_angstrom=D, truth=truth, grid_spacing_deg=5.0)
    assert ev["density_correlation"] == pytest.approx(1.0, abs=1e-9)
    assert ev["density_correlation_in_mask"] == pytest.approx(1.0, abs=1e-9)
    assert ev["density_hand"] == "same"
    np.testing.assert_allclose(ev["density_shift_voxels"], 0.0, atol=1e-9)
    np.testing.assert_allclose(ev["fsc_curve"]["fsc"], 1.0, atol=1e-6)
    # FSC = 1 in every shell never crosses a threshold: no resolution (the old code reported
    # Nyquist as if the data stopped there), "not reached, better than Nyquist"
    for key in ("fsc_resolution_0p5", "fsc_resolution_0p143"):
        assert ev[key + "_angstrom"] is None
        assert ev[key + "_reached"] is False and ev[key + "_status"] == "not reached"
        assert ev[key + "_better_than_angstrom"] == 2 * D
        assert describe_resolution(ev, key) == f"not reached (better than {2 * D:.1f} A)"
    assert ev["intensity_correlation"] == pytest.approx(1.0, abs=1e-9)
    oe = ev["orientation_error_deg"]
    assert oe["median"] < 1e-5 and oe["p90"] < 1e-5 and oe["frac_within_grid_spacing"] == 1.0
    assert angle_deg(quat.quaternion_to_matrix(ev["global_rotation_quaternion"]), np.eye(3)) < 1e-5
    json.dumps(ev, allow_nan=False)


def test_evaluate_recovers_rotation_hand_and_shift(molecule):
    pos, amp = molecule
    rng = np.random.default_rng(9)
    g = random_rotation(23)
    qg = quat.matrix_to_quaternion(g)
    q_true = quat.random_quaternions(400, rng)
    q_rec = quat.multiply(quat.conjugate(qg), q_true)
    # Small orientation noise on every image plus 15 % outright wrong ones.
    noise = quat.normalize(np.column_stack([np.ones(400), 0.002 * rng.standard_normal((400, 3))]))
    q_rec = quat.multiply(q_rec, noise)
    q_rec[:60] = quat.random_quaternions(60, rng)
    t = np.array([2.0, -1.0, 1.0])
    rho_rec, i_rec = rotated_mirrored_shifted(pos, amp, g, t)
    # The data are consistent with the slicing convention: image i reads the same values
    # from I_true at R_true s as from I_rec at R_rec s (analytic intensities).
    s = rng.uniform(-0.4, 0.4, size=(3, 64))
    for i in range(60, 65):
        rt = quat.quaternion_to_matrix(q_true[i])
        rr = quat.quaternion_to_matrix(quat.multiply(quat.conjugate(qg), q_true[i]))
        np.testing.assert_allclose(analytic_intensity(-(pos @ g) + t, amp, rr @ s),
                                   analytic_intensity(pos, amp, rt @ s), rtol=1e-9, atol=1e-12)
    truth = make_truth(pos, amp, q=q_true)
    ev = evaluate_arrays(density=rho_rec.astype(np.float32), intensity=i_rec.astype(np.float32),
                         orientations=q_rec, voxel_size_angstrom=D, truth=truth)
    g_fit = quat.quaternion_to_matrix(ev["global_rotation_quaternion"])
    assert angle_deg(g_fit, g) < 0.2
    assert ev["orientation_convention"] == "direct"
    assert ev["density_hand"] == "mirrored"
    np.testing.assert_allclose(ev["density_shift_voxels"], g @ t, atol=0.3)
    assert ev["density_correlation"] > 0.95
    assert ev["intensity_correlation"] > 0.95
    # Noise 0.002 per vector component: angle ~ 4e-3 * chi_3 rad, median about 0.35 deg.
    assert 0.1 < ev["orientation_error_deg"]["median"] < 0.6
    assert ev["orientation_error_deg"]["p90"] > 10  # the 15 % wrong images show up
    # a good reconstruction: FSC 0.5 below 3 voxels, or never crossed (better than Nyquist)
    res = ev["fsc_resolution_0p5_angstrom"]
    if res is None:
        assert ev["fsc_resolution_0p5_status"] == "not reached"
        assert ev["fsc_resolution_0p5_better_than_angstrom"] == 2 * D
    else:
        assert ev["fsc_resolution_0p5_reached"] and res < 3 * D


def test_unrelated_density_scores_low(molecule):
    pos, amp = molecule
    rng = np.random.default_rng(99)
    # A different molecule: twelve sharper blobs (over ten seeds, correlation 0.30-0.44).
    other = blobs(rng.uniform(-5.5, 5.5, size=(12, 3)), rng.uniform(0.5, 1.5, size=12), sigma=0.8)
    q = quat.random_quaternions(100, rng)
    truth = make_truth(pos, amp, q=q)
    ev = evaluate_arrays(density=other, intensity=intensity_of(other), orientations=q,
                         voxel_size_angstrom=D, truth=truth)
    assert ev["density_correlation"] < 0.5
    assert ev["fsc_resolution_0p5_angstrom"] > 5 * D


def test_search_rotation_without_orientations(molecule):
    pos, amp = molecule
    g = random_rotation(24)
    _, i_rec = rotated_mirrored_shifted(pos, amp, g, np.zeros(3))
    i_true = intensity_of(blobs(pos, amp))
    g_fit, info = search_rotation(i_rec, i_true)
    assert angle_deg(g_fit, g) < 3.0
    assert pearson(rotate_volume(i_rec, g_fit), i_true) > 0.99
    assert info["n_evaluations"] > info["n_coarse"]


def test_shape_and_voxel_mismatch_raise(molecule):
    truth = make_truth(*molecule)
    with pytest.raises(ValueError, match="shape"):
        evaluate_arrays(density=np.zeros((M - 2,) * 3), intensity=np.zeros((M - 2,) * 3),
                        orientations=None, voxel_size_angstrom=D, truth=truth)
    with pytest.raises(ValueError, match="voxel size"):
        evaluate_arrays(density=truth.density, intensity=truth.intensity, orientations=None,
                        voxel_size_angstrom=1.1 * D, truth=truth)


# ------------------------------------------------------------ files and CLI ---

def write_result(out, rho, inten, q, d=D, config='[algorithm]\nn_orientations = 1000\n'):
    out.mkdir(parents=True, exist_ok=True)
    with h5py.File(out / "result.h5", "w") as f:
        f["density"] = rho.astype(np.float32)
        f["intensity"] = inten.astype(np.float32)
        f["autocorrelation"] = np.zeros_like(rho, dtype=np.float32)
        f["support"] = (rho > 0.1 * rho.max()).astype(np.uint8)
        if q is not None:
            f["orientations"] = q
        f.attrs.update(voxel_size_angstrom=d, reciprocal_extent_inv_angstrom=1 / (2 * d),
                       generation=3, n_ranks=2, spinifel_version="0.1.0", config=config)


def write_truth(path, truth: GroundTruth, with_group=True):
    with h5py.File(path, "w") as f:
        f["orientations"] = truth.orientations[:, None, :]
        if with_group:
            g = f.create_group("ground_truth")
            g["density"] = truth.density
            g["intensity"] = truth.intensity
            g.attrs.update(voxel_size_angstrom=truth.voxel_size_angstrom, M=M,
                           structure_name="blobs")


def test_evaluate_command_end_to_end(molecule, tmp_path, capsys):
    pos, amp = molecule
    rng = np.random.default_rng(10)
    g = random_rotation(25)
    q_true = quat.random_quaternions(120, rng)
    q_rec = quat.multiply(quat.conjugate(quat.matrix_to_quaternion(g)), q_true[:100])
    rho_rec, i_rec = rotated_mirrored_shifted(pos, amp, g, np.array([1.0, 0.0, -2.0]))
    out = tmp_path / "out"
    write_result(out, rho_rec, i_rec, q_rec)
    metrics = {"generations": [
        {"generation": k, "timings": {"merge": 1.0, "match": 0.5}, "cg_iterations": 20 - k,
         "lambda": 1e-3, "orientation_change": 1 / (k + 1),
         "evaluation": {"density_correlation": 0.5 + 0.1 * k}} for k in range(4)]}
    (out / "metrics.json").write_text(json.dumps(metrics))
    truth_path = tmp_path / "data.h5"
    write_truth(truth_path, make_truth(pos, amp, q=q_true))
    assert load_ground_truth(truth_path).orientations.shape == (120, 4)

    parser = argparse.ArgumentParser()
    cmd.add_args(parser)
    assert cmd.main(parser.parse_args([str(out), "--truth", str(truth_path)])) == 0
    text = capsys.readouterr().out
    assert "density correlation" in text and "FSC resolution" in text and "median" in text
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["density_hand"] == "mirrored" and ev["density_correlation"] > 0.95
    assert ev["orientation_error_deg"]["n_images"] == 100
    spacing = math.degrees(quat.grid_spacing(1000))
    assert ev["orientation_error_deg"]["grid_spacing_deg"] == pytest.approx(spacing)
    assert ev["orientation_error_deg"]["frac_within_grid_spacing"] == 1.0
    for name in ("fsc.png", "sections_density.png", "sections_intensity.png",
                 "orientation_errors.png", "convergence.png"):
        assert (out / name).stat().st_size > 1000, name
        assert name in ev["plots"]
    assert not list(out.glob(".*tmp"))

    assert cmd.main(parser.parse_args([str(out), "--truth", str(truth_path), "--no-plots",
                                       "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["plots"] == []


def test_user_errors(molecule, tmp_path):
    pos, amp = molecule
    truth = make_truth(pos, amp, q=quat.random_quaternions(10, np.random.default_rng(2)))
    with pytest.raises(OutputError, match="result.h5"):
        evaluate_result(tmp_path, truth_path=tmp_path / "missing.h5")
    out = tmp_path / "out"
    write_result(out, truth.density, truth.intensity, truth.orientations)
    with pytest.raises(DatasetError, match="file not found"):
        evaluate_result(out, truth_path=tmp_path / "missing.h5")
    with pytest.raises(SpinifelError, match="--truth"):
        evaluate_result(out)
    bare = tmp_path / "skopi.h5"
    write_truth(bare, truth, with_group=False)
    assert load_ground_truth(bare) is None
    with pytest.raises(DatasetError, match="ground_truth"):
        evaluate_result(out, truth_path=bare)
    small = tmp_path / "small"
    write_result(small, truth.density[1:-1, 1:-1, 1:-1], truth.intensity[1:-1, 1:-1, 1:-1], None)
    good = tmp_path / "data.h5"
    write_truth(good, truth)
    with pytest.raises(DatasetError, match="grid shape"):
        evaluate_result(small, truth_path=good)
    other_d = tmp_path / "other_d"
    write_result(other_d, truth.density, truth.intensity, None, d=2 * D)
    with pytest.raises(DatasetError, match="voxel_size_angstrom"):
        evaluate_result(other_d, truth_path=good)
    too_many = tmp_path / "too_many"
    write_result(too_many, truth.density, truth.intensity, quat.random_quaternions(
        11, np.random.default_rng(0)))
    with pytest.raises(DatasetError, match="orientations"):
        evaluate_result(too_many, truth_path=good, plots=False)


def test_evaluate_without_orientations_searches(molecule):
    pos, amp = molecule
    g = random_rotation(26)
    rho_rec, i_rec = rotated_mirrored_shifted(pos, amp, g, np.array([0.0, 1.0, -1.0]))
    ev = evaluate_arrays(density=rho_rec, intensity=i_rec, orientations=None,
                         voxel_size_angstrom=D, truth=make_truth(pos, amp))
    assert ev["global_rotation_source"] == "intensity_search"
    assert ev["orientation_error_deg"] is None
    assert angle_deg(quat.quaternion_to_matrix(ev["global_rotation_quaternion"]), g) < 3.0
    assert ev["density_hand"] == "mirrored" and ev["density_correlation"] > 0.95


def test_pdb_truth_is_rendered_on_the_result_grid(molecule, tmp_path, monkeypatch):
    """--pdb renders with spinifel.simulate (stand-in modules here) at the result's M and
    reciprocal extent in inverse metres; --truth then only supplies orientations."""
    import sys
    import types

    pos, amp = molecule
    rho = blobs(pos, amp)
    calls = []
    structure_mod = types.ModuleType("spinifel.simulate.structure")
    structure_mod.load_structure = lambda path: ("structure", str(path))
    truth_mod = types.ModuleType("spinifel.simulate.truth")

    def render(structure, m, extent_inv_m):
        calls.append((structure, m, extent_inv_m))
        return rho, intensity_of(rho)  # the (density, intensity) pair of the real function

    truth_mod.render_ground_truth = render
    monkeypatch.setitem(sys.modules, "spinifel.simulate.structure", structure_mod)
    monkeypatch.setitem(sys.modules, "spinifel.simulate.truth", truth_mod)
    q = quat.random_quaternions(30, np.random.default_rng(4))
    out = tmp_path / "out"
    write_result(out, rho, intensity_of(rho), q)
    pdb = tmp_path / "mol.pdb"
    pdb.write_text("END\n")
    bare = tmp_path / "skopi.h5"
    write_truth(bare, make_truth(pos, amp, q=q), with_group=False)
    ev = evaluate_result(out, truth_path=bare, pdb=pdb, plots=False)
    assert calls == [(("structure", str(pdb)), M, pytest.approx(1e10 / (2 * D)))]
    assert ev["truth_name"] == "mol"
    assert ev["density_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert ev["orientation_error_deg"]["median"] < 1e-5
