"""Tests of scripts/peer_dragonfly.py (the Dragonfly peer-comparison helper).

Only the parts that do not need the Dragonfly binaries: the global-rotation fit, the
volume resampling used for the intensity correlation, the sparse photon file, the beta
schedule and the grid sampling floor. References are independent: known rotations,
analytic volumes, dense counts, brute-force nearest neighbours.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "peer_dragonfly.py"
_spec = importlib.util.spec_from_file_location("peer_dragonfly", _PATH)
pdf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pdf)


def test_qmul_matches_matrix_product(rng: np.random.Generator) -> None:
    """Catches a sign/order error in the Hamilton product or the matrix: R(a b) = R(a) R(b)."""
    a, b = pdf.random_quaternions(2, rng)
    np.testing.assert_allclose(pdf.qmatrix(pdf.qmul(a, b)), pdf.qmatrix(a) @ pdf.qmatrix(b),
                               atol=20 * np.finfo(np.float64).eps)


def test_fit_global_rotation_recovers_g_with_outliers(rng: np.random.Generator) -> None:
    """Catches a fit that averages outliers in, or applies g on the wrong side.

    40% of the frames are random; the rest are ``g (x) q_rec`` tilted by 2 degrees.
    """
    n = 1000
    g = pdf.random_quaternions(1, rng)[0]
    q_rec = pdf.random_quaternions(n, rng)
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    tilt = np.concatenate([np.full((n, 1), math.cos(math.radians(1.0))),
                           math.sin(math.radians(1.0)) * axis], axis=1)
    q_true = pdf.qmul(tilt, pdf.qmul(g, q_rec))
    bad = rng.random(n) < 0.4
    q_true[bad] = pdf.random_quaternions(int(bad.sum()), rng)
    g_fit, info = pdf.fit_global_rotation(q_true, q_rec, n_cand=64)
    assert pdf.qangle_deg(g_fit, g) < 0.5
    assert info["refined_median_deg"] <= info["seed_median_deg"]


def _gauss_blobs(x: np.ndarray) -> np.ndarray:
    """Anisotropic analytic test function of points ``(3, n)`` (no rotational symmetry)."""
    centres = np.array([[6.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, -14.0]]).T
    out = np.zeros(x.shape[1])
    for j, w in enumerate((3.0, 2.0, 1.0)):
        out += w * np.exp(-np.sum((x - centres[:, j:j + 1]) ** 2, axis=0) / 8.0)
    return out


def test_intensity_cc_uses_g_transpose(tmp_path: Path, rng: np.random.Generator) -> None:
    """Catches a transposed G or a wrong voxel scale in the resampling onto the truth grid.

    Truth ``f(k)`` on a 31^3 grid; Dragonfly-like model ``D(x) = f(G x)`` on its grid in
    voxel units (here the scale factor is 1). The right g gives CC ~ 1, g^-1 does not.
    """
    m, ext = 31, 1.0
    wavelength, ewald = 1.0, m / (2.0 * ext)  # truth spacing 2 ext / m -> 1 voxel
    ax = np.arange(m) - (m - 1) / 2.0
    k = np.stack(np.meshgrid(ax, ax, ax, indexing="ij")).reshape(3, -1)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        grp = f.create_group("ground_truth")
        grp.attrs["reciprocal_extent"] = ext
        grp.create_dataset("intensity", data=_gauss_blobs(k).reshape(m, m, m))
    g = pdf.random_quaternions(1, rng)[0]
    size = 41
    axd = np.arange(size) - size // 2
    x = np.stack(np.meshgrid(axd, axd, axd, indexing="ij")).reshape(3, -1)
    model = _gauss_blobs(pdf.qmatrix(g) @ x).reshape(size, size, size)
    info = {"detector": {"ewald_rad": ewald, "q_min_vox": 0.0, "q_max_vox": 15.0}}
    with h5py.File(tmp_path / "t.h5", "r") as f:
        good = pdf.intensity_cc(model, np.ones_like(model), f, g, info, wavelength)
        wrong = pdf.intensity_cc(model, np.ones_like(model), f, pdf.qconj(g), info, wavelength)
    assert good["cc"] > 0.99
    assert wrong["cc"] < 0.9


def test_write_photons_roundtrip(tmp_path: Path, rng: np.random.Generator) -> None:
    """Catches lost or misplaced photons in the sparse file (ones vs multi, masked pixels)."""
    counts = rng.poisson(0.7, size=(5, 50)).astype(np.float32)
    good = np.ones(50, dtype=bool)
    good[[3, 17]] = False
    info = pdf.write_photons(str(tmp_path / "p.h5"), counts, good)
    with h5py.File(tmp_path / "p.h5", "r") as h:
        assert int(h["num_pix"][0]) == 50
        for i in range(5):
            dense = np.zeros(50, dtype=np.int64)
            dense[h["place_ones"][i]] += 1
            dense[h["place_multi"][i]] += h["count_multi"][i]
            assert h["place_ones"][i].dtype == np.int32
            expect = counts[i].astype(np.int64) * good
            np.testing.assert_array_equal(dense, expect)
    assert info["n_frames"] == 5


def test_beta_schedule_reaches_one_near_three_quarters() -> None:
    """Catches a schedule whose beta stays far below 1 (the pseudo-symmetric lock-in)."""
    for photons, n_iter in ((2000.0, 24), (500.0, 24), (2000.0, 30)):
        s = pdf.beta_schedule(photons, n_iter)
        # independent replay of Dragonfly's rule: beta0 * jump ** ((it - 1) // period)
        beta = [min(1.0, s["beta0_median_frame"] * 2.0 ** ((it - 1) // s["period"]))
                for it in range(1, n_iter + 1)]
        first = 1 + beta.index(1.0)
        assert abs(first - 0.75 * n_iter) <= s["period"]
        assert beta[0] < 0.1


def test_nearest_angle_brute_force(rng: np.random.Generator) -> None:
    """Catches a chunking or q/-q error in the sampling-floor distance."""
    grid = pdf.random_quaternions(37, rng)
    q = pdf.random_quaternions(9, rng)
    ref = [min(pdf.qangle_deg(a, b) for b in grid) for a in q]
    np.testing.assert_allclose(pdf.nearest_angle_deg(q, grid, chunk=4), ref, atol=1e-9)


@pytest.mark.parametrize("bad", [np.array([[0.5, 1.5]])])
def test_write_photons_rejects_non_integers(tmp_path: Path, bad: np.ndarray) -> None:
    """Catches silently rounding non-count data (e.g. an intensity, not photons)."""
    with pytest.raises(ValueError, match="photon counts"):
        pdf.write_photons(str(tmp_path / "p.h5"), bad, np.ones(2, dtype=bool))


def test_self_consistency_prefers_the_right_slice(tmp_path: Path,
                                                  rng: np.random.Generator) -> None:
    """Catches a slice taken with R instead of R^T (Dragonfly's transpose) or G instead of G^T.

    Frames are the noise-free slices of an analytic model at Dragonfly orientations
    ``q_d``; the truth is ``g (x) conj(q_d)``. Then pick and truth-mapped slices coincide
    (difference ~ 0); a wrong pick makes the truth more likely.
    """
    size = 41
    axd = np.arange(size) - size // 2
    x = np.stack(np.meshgrid(axd, axd, axd, indexing="ij")).reshape(3, -1)
    model = _gauss_blobs(x).reshape(size, size, size) + 1e-3
    u = np.linspace(-15, 15, 16)
    px, py = np.meshgrid(u, u, indexing="ij")
    q = np.stack([px.ravel(), py.ravel(), -0.02 * (px.ravel() ** 2 + py.ravel() ** 2)])
    with h5py.File(tmp_path / "det.h5", "w") as d:
        for i, k in enumerate(("qx", "qy", "qz")):
            d[k] = q[i]
        d["mask"] = np.zeros(q.shape[1], dtype=np.uint8)
    from scipy import ndimage
    n = 6
    q_d = pdf.random_quaternions(n, rng)
    g = pdf.random_quaternions(1, rng)[0]
    frames = np.array([1e3 * ndimage.map_coordinates(model, pdf.qmatrix(qq).T @ q + size // 2,
                                                     order=1) for qq in q_d])
    q_true = pdf.qmul(g, pdf.qconj(q_d))
    ok = pdf.self_consistency(model, str(tmp_path / "det.h5"), frames, q_true, q_d, g)
    assert abs(ok["median_loglik_pick_minus_truth"]) < 1e-6 * frames.sum() / n
    bad = pdf.self_consistency(model, str(tmp_path / "det.h5"), frames, q_true,
                               pdf.random_quaternions(n, rng), g)
    assert bad["frac_truth_more_likely"] == 1.0
