"""Box size from the data (geometry/box.py, issue 13 item 6)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from spinifel.geometry import box
from spinifel.merging.merge import ball_support
from spinifel.phasing.algorithms import autocorrelation_from_density
from spinifel.simulate import dataset as ds
from spinifel.simulate.structure import builtin_molecule, load_structure

PDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "pdb"  # ../shared beside the clone


def _ball(M: int, radius: float, centre: float | None = None) -> np.ndarray:
    c = (M - 1) / 2 if centre is None else centre
    x = np.arange(M) - c
    y = np.arange(M) - (M - 1) / 2
    r2 = x[:, None, None] ** 2 + y[None, :, None] ** 2 + y[None, None, :] ** 2
    return (r2 <= radius * radius).astype(np.float64)


def test_choose_M_brute_force_and_calibration():
    """Catches an M whose ball support cannot hold the autocorrelation (radius D): compared
    with the smallest odd M found by brute force, and the documented calibration values."""
    for extent in (1.55e9, 1.4e9):
        d = 1 / (2 * extent)
        for diam_a in (20.0, 58.0, 67.8, 92.2, 150.0):
            D = diam_a * 1e-10
            ref = next(M for M in range(9, 1001, 2) if (M - 1) / 2 * d >= 1.1 * D - 1e-18)
            assert box.choose_M(D, extent) == ref
    # Documented calibration: built-in 58 A at 3.27 A -> 41 (today's default); 2CEX 67.8 A at
    # 3.22 A -> 49; 1EI7 92.2 A at 3.24 A -> 65 (61 with margin 0.05).
    assert box.choose_M(58.0e-10, 1 / (2 * 3.27e-10)) == 41
    assert box.choose_M(67.8e-10, 1 / (2 * 3.22e-10)) == 49
    assert box.choose_M(92.2e-10, 1 / (2 * 3.24e-10)) == 65
    assert box.choose_M(92.2e-10, 1 / (2 * 3.24e-10), margin=0.05) == 61
    assert box.choose_M(1e-12, 1.5e9) == 9 and box.choose_M(1e-6, 1.5e9) == 513
    with pytest.raises(ValueError, match="diameter"):
        box.choose_M(0.0, 1.5e9)


def test_chosen_box_holds_the_autocorrelation():
    """Catches a rule off by a factor 2 (box sized on the diameter instead of the
    autocorrelation's 2 D): the autocorrelation of a ball of diameter D fits the ball support
    of the chosen M with room to spare, and touches it in a box 12 voxels smaller (about
    half the needed size plus D, the size a rule on D alone would give)."""
    d = 1.0  # voxel units: reciprocal extent 0.5
    radius = 7.0  # ball of diameter 15 voxels (edge voxels included)
    M = box.choose_M(2 * radius + 1, 1 / (2 * d))
    ac = autocorrelation_from_density(_ball(M, radius))
    assert box.support_touches_edge(ac, ball_support(M)) < 1e-6
    small = M - 12
    ac_small = autocorrelation_from_density(_ball(small, radius))
    assert box.support_touches_edge(ac_small, ball_support(small)) > 0.05


def test_support_touches_edge_known_objects():
    """Catches a shell taken inside the support (or the box) instead of at its edge."""
    M = 31
    centred = _ball(M, 6)
    assert box.support_touches_edge(centred) == 0.0
    shifted = _ball(M, 6, centre=3.0)  # reaches index 0 along x
    assert box.support_touches_edge(shifted) == 1.0
    assert box.support_touches_edge(centred, ball_support(M, 0.4)) == 1.0  # radius 6 = 0.4 * 15
    assert box.support_touches_edge(centred, ball_support(M, 0.6)) == 0.0


def test_diameter_from_autocorrelation_of_ball():
    """Catches reporting the autocorrelation's extent (2 D) or its radius in the wrong unit:
    a ball of voxel centres within R has diameter 2 R and an autocorrelation of radius 2 R."""
    M, R = 41, 6
    ac = autocorrelation_from_density(_ball(M, R))
    d = 3e-10
    est = box.diameter_from_autocorrelation(ac, d, threshold=0.01)
    assert abs(est / d - 2 * R) <= 1.0


def test_radial_profile_matches_direct_loop():
    """Catches mis-binned pixels and a wrong standard error against a direct loop."""
    rng = np.random.default_rng(3)
    s = rng.uniform(1e8, 1e9, 200)
    img = rng.poisson(5.0, (7, 200)).astype(np.float64)
    e = box.radial_edges(s, 10)
    parts = box.radial_sums(img[:3], s, e) + box.radial_sums(img[3:], s, e)  # two "ranks"
    prof = box.radial_profile(parts, s, e)
    for k in range(10):
        inb = (s >= e[k]) & (s < e[k + 1])
        vals = img[:, inb].ravel()
        assert prof.s[k] == pytest.approx(s[inb].mean(), rel=1e-12)
        assert prof.mean[k] == pytest.approx(vals.mean(), rel=1e-12)
        assert prof.sem[k] == pytest.approx(vals.std() / np.sqrt(vals.size), rel=1e-9)


def _estimate(path: Path) -> box.DiameterEstimate:
    with h5py.File(path, "r") as h5:
        n = h5["intensities"].shape[0]
        img = h5["intensities"][:, 0].reshape(n, -1)
        good = h5["mask"][0].ravel().astype(bool)
        s = np.linalg.norm(h5["pixel_position_reciprocal"][0].reshape(-1, 3), axis=1)[good]
    e = box.radial_edges(s)
    return box.estimate_diameter(box.radial_profile(box.radial_sums(img[:, good], s, e), s, e))


def test_diameter_of_builtin_molecule_from_images(tmp_path):
    """Catches a broken profile fit (the estimate must be within 15 % of the largest atom
    distance) and a missing calibration (the raw fit is about 0.75 of it), on noise-free
    images with a beamstop and a gap; and flags a beamstop that hides the first speckles."""
    mol = builtin_molecule(seed=0)
    true = mol.max_extent()
    geo = ds.DETECTOR_PRESETS["photon-limited"]
    p = tmp_path / "b.h5"
    ds.simulate_dataset(p, mol, n_images=120, M=15, seed=2, gap_rows=4, workers=2, **geo)
    est = _estimate(p)
    assert abs(est.diameter_m * 1e10 / true - 1) < 0.15 and est.reliable
    assert est.fitted_m * 1e10 < 0.85 * true  # the calibration matters
    q = tmp_path / "q.h5"
    ds.simulate_dataset(q, mol, n_images=60, M=15, seed=2, workers=2,
                        **{**geo, "beamstop_radius_px": 14.0})
    assert not _estimate(q).reliable


@pytest.mark.slow
def test_diameter_of_builtin_molecule_from_noisy_images(tmp_path):
    """Catches an estimator that breaks on photon-limited data: 2000 photons per image,
    log-normal fluence jitter 0.5, background 0.05 photons per pixel, a 4-row gap."""
    mol = builtin_molecule(seed=0)
    p = tmp_path / "n.h5"
    ds.simulate_dataset(p, mol, n_images=600, M=15, seed=2, photons_per_image=2000.0,
                        fluence_sigma=0.5, background_photons_per_pixel=0.05, gap_rows=4,
                        workers=2, **ds.DETECTOR_PRESETS["photon-limited"])
    est = _estimate(p)
    assert abs(est.diameter_m * 1e10 / mol.max_extent() - 1) < 0.15 and est.reliable


@pytest.mark.slow
@pytest.mark.parametrize("name", ["2cex", "1ei7"])
def test_diameter_of_pdb_molecules_from_images(tmp_path, name):
    """Catches an estimator tuned to the built-in molecule only: 2CEX (67.8 A) and the
    elongated 1EI7 (92.2 A; measured -13 %) on issue 13's geometry, within 15 %."""
    f = PDB / f"{name}.pdb"
    if not f.is_file():
        pytest.skip(f"{f} absent")
    mol = load_structure(f)
    p = tmp_path / "m.h5"
    ds.simulate_dataset(p, mol, n_images=1000, M=15, seed=3, workers=2,
                        **ds.DETECTOR_PRESETS["photon-limited"])
    est = _estimate(p)
    assert abs(est.diameter_m * 1e10 / mol.max_extent() - 1) < 0.15 and est.reliable
