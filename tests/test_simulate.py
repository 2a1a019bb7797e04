"""Tests of `spinifel-mpi simulate`: form factors, scattering, detector, ground truth, writer."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from spinifel.errors import ConfigError, DatasetError, OutputError
from spinifel.geometry import detector as det
from spinifel.geometry.orientations import multiply, quaternion_to_matrix, random_quaternions
from spinifel.simulate import dataset as ds
from spinifel.simulate.formfactors import atomic_number, form_factor, it92_coefficients
from spinifel.simulate.scatter import StructureFactorPlan, structure_factor, structure_factor_direct
from spinifel.simulate.structure import Structure, builtin_molecule, load_structure
from spinifel.simulate.truth import (
    grid_structure_factor,
    reciprocal_grid_axis,
    render_ground_truth,
    voxel_size_angstrom,
)

F32 = np.finfo(np.float32).eps


@pytest.fixture(scope="module")
def small_molecule() -> Structure:
    return builtin_molecule(seed=5, n_atoms=120)


def _random_s(rng: np.random.Generator, n: int, s_max: float) -> np.ndarray:
    return rng.uniform(-s_max, s_max, (3, n))


# ----------------------------------------------------------------------------- form factors

@pytest.mark.parametrize("sym", ["H", "C", "N", "O", "S", "P", "Fe", "Zn", "Se"])
def test_form_factor_at_zero_is_atomic_number(sym):
    # IT92 fits reproduce f(0) = Z to about 0.01 electron (sum a_i + c).
    assert abs(form_factor(sym, 0.0) - atomic_number(sym)) < 0.02


def test_form_factor_units_and_shape():
    import gemmi

    s = np.linspace(0.0, 1.0, 11)  # |s| in 1/A
    for sym in ("C", "S", "Zn"):
        ref = [gemmi.Element(sym).it92.calculate_sf((x / 2.0) ** 2) for x in s]
        # gemmi evaluates the table in float32: compare at float32 accuracy.
        np.testing.assert_allclose(form_factor(sym, s), ref, rtol=1e-6, atol=1e-6)
        assert np.all(np.diff(form_factor(sym, s)) < 0)
    a, b, _c = it92_coefficients("C")
    assert a.shape == b.shape == (4,) and np.all(b > 0)
    assert form_factor("O", np.zeros((2, 3))).shape == (2, 3)
    with pytest.raises(ValueError, match="Xx"):
        form_factor("Xx", 0.1)


# -------------------------------------------------------------------------------- scattering

def test_direct_sum_two_atoms_analytic():
    r = np.array([[1.0, -2.0, 0.5], [-3.0, 0.25, 2.0]])
    st = Structure(name="pair", xyz=r, elements=np.array(["C", "S"]))
    s = _random_s(np.random.default_rng(1), 50, 0.3)
    sn = np.linalg.norm(s, axis=0)
    fc, fs = form_factor("C", sn), form_factor("S", sn)
    expect = fc * np.exp(-2j * np.pi * (r[0] @ s)) + fs * np.exp(-2j * np.pi * (r[1] @ s))
    np.testing.assert_allclose(structure_factor_direct(st, s), expect, rtol=1e-13)
    i2 = fc**2 + fs**2 + 2 * fc * fs * np.cos(2 * np.pi * ((r[0] - r[1]) @ s))
    np.testing.assert_allclose(np.abs(structure_factor_direct(st, s)) ** 2, i2, rtol=1e-12)


@pytest.mark.parametrize("eps", [1e-4, 1e-6, 1e-10])
def test_type3_matches_direct_sum(small_molecule, eps):
    s = _random_s(np.random.default_rng(2), 3000, 0.2)
    ref = structure_factor_direct(small_molecule, s)
    got = structure_factor(small_molecule, s, eps=eps)
    assert got.dtype == np.complex128 and got.shape == (3000,)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 10 * eps


def test_pinned_box_makes_points_independent(small_molecule):
    s = _random_s(np.random.default_rng(3), 2000, 0.15)
    plan = StructureFactorPlan(small_molecule, eps=1e-6, nthreads=1, s_bound=0.15)
    full = plan(s)
    part = plan(s[:, 100:400])
    assert np.array_equal(full[100:400], part)  # bitwise: batching cannot change results
    ref = structure_factor_direct(small_molecule, s)
    assert np.linalg.norm(full - ref) / np.linalg.norm(ref) < 10 * 1e-6
    with pytest.raises(ValueError, match="s_bound"):
        plan(s * 2)


# ---------------------------------------------------------------------------------- detector

def test_photon_energy_to_wavelength():
    # 12398.42 eV <-> 1 angstrom (h c = 12398.4198 eV A).
    assert det.photon_energy_to_wavelength(12398.419843320026) == pytest.approx(1e-10, rel=1e-12)
    with pytest.raises(ValueError):
        det.photon_energy_to_wavelength(-1.0)


def test_pixel_positions_on_ewald_sphere():
    n, pix, dist, lam = 9, 2e-3, 0.1, 1.5e-10
    s = det.flat_detector_positions(n, pix, dist, lam)
    assert s.shape == (1, n, n, 3) and s.dtype == np.float64
    # Independent geometry: pixel (i, j) centre at ((j-4) pix, (i-4) pix, dist); scattering
    # angle 2 theta from its distance to the beam axis.
    for i in range(n):
        for j in range(n):
            x, y = (j - 4) * pix, (i - 4) * pix
            two_theta = np.arctan2(np.hypot(x, y), dist)
            expect = 2 * np.sin(two_theta / 2) / lam
            assert np.linalg.norm(s[0, i, j]) == pytest.approx(expect, rel=1e-12, abs=1e-6)
            # in-plane direction follows the pixel
            if (i, j) != (4, 4):
                ang = np.arctan2(s[0, i, j, 1], s[0, i, j, 0])
                assert np.cos(ang - np.arctan2(y, x)) == pytest.approx(1.0, abs=1e-12)
    # Ewald sphere |s + k_in/lambda| = 1/lambda, and symmetry about the beam.
    k_in = np.array([0.0, 0.0, 1.0 / lam])
    np.testing.assert_allclose(np.linalg.norm(s + k_in, axis=-1), 1 / lam, rtol=1e-14)
    np.testing.assert_allclose(s[0, ::-1, ::-1, :2], -s[0, :, :, :2], atol=1e-6)
    assert np.all(s[..., 2] <= 0)


def test_default_geometry_resolution():
    lam = det.photon_energy_to_wavelength(det.DEFAULT_PHOTON_ENERGY_EV)
    pos = det.flat_detector_positions(64, det.DEFAULT_PIXEL_SIZE_M, det.DEFAULT_DISTANCE_M, lam)
    edge, corner = det.resolution_angstrom(pos)
    assert 8.0 <= edge <= 10.0 and corner < edge
    pos128 = det.flat_detector_positions(128, det.DEFAULT_PIXEL_SIZE_M,
                                         det.DEFAULT_DISTANCE_M, lam)
    assert det.resolution_angstrom(pos128)[0] < 5.0


def test_beamstop_mask():
    m = det.beamstop_mask(8, 1.5)
    assert m.shape == (1, 8, 8) and m.dtype == np.uint8
    assert m[0, 3:5, 3:5].sum() == 0 and m.sum() == 64 - 4  # centres at 0.707 px
    assert det.beamstop_mask(8, 0.0).all()


# ------------------------------------------------------------------------------ ground truth

def test_ground_truth_grid_convention():
    st = builtin_molecule(seed=2, n_atoms=40)
    M = 11
    extent_a = float(np.abs(st.xyz).max())
    # Choose the grid so that the molecule fills less than a third of the box.
    d = 3 * extent_a / M * 1.05
    rext = 1e10 / (2 * d)
    assert voxel_size_angstrom(rext) == pytest.approx(d)
    density, intensity = render_ground_truth(st, M, rext)
    assert density.shape == intensity.shape == (M, M, M)
    assert density.dtype == intensity.dtype == np.float32

    # F on the grid against the direct sum at k = (l - (M-1)/2) / (M d).
    k = reciprocal_grid_axis(M, rext)
    kk = np.stack(np.meshgrid(k, k, k, indexing="ij")).reshape(3, -1)
    f_ref = structure_factor_direct(st, kk).reshape(M, M, M)
    np.testing.assert_allclose(intensity, np.abs(f_ref) ** 2,
                               atol=10 * F32 * np.abs(f_ref).max() ** 2)
    # d^3 fftshift(fftn(ifftshift(density))) reproduces F.
    f_back = d**3 * np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(density.astype(np.float64))))
    assert np.abs(f_back - f_ref).max() < 100 * F32 * np.abs(f_ref).max()
    # Total charge: sum(density) d^3 = F(0) = sum of f(0) ~ number of electrons.
    n_el = sum(form_factor(e, 0.0) for e in st.elements)
    assert density.sum() * d**3 == pytest.approx(n_el, rel=1e-5)

    # Brute-force circular autocorrelation ac[l] = d^3 sum_j rho[j] rho[j + l] (centred) and
    # intensity == d^3 real(fftshift(fftn(ifftshift(ac)))).
    rho = np.fft.ifftshift(density.astype(np.float64))  # index 0 = origin
    ac0 = np.empty_like(rho)
    for a in range(M):
        for b in range(M):
            for c in range(M):
                ac0[a, b, c] = np.sum(rho * np.roll(rho, (-a, -b, -c), axis=(0, 1, 2)))
    ac = np.fft.fftshift(ac0) * d**3
    i_from_ac = d**3 * np.real(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(ac))))
    np.testing.assert_allclose(i_from_ac, intensity, atol=100 * F32 * intensity.max())


def test_ground_truth_voxel_index_is_position():
    # One iron atom at r = (2d, -d, 0): the band-limited density peaks at voxel c + (2, -1, 0).
    M, d = 15, 4.0
    rext = 1e10 / (2 * d)
    st = Structure(name="fe", xyz=np.array([[2 * d, -d, 0.0]]), elements=np.array(["Fe"]))
    density, _ = render_ground_truth(st, M, rext)
    c = (M - 1) // 2
    assert np.unravel_index(np.argmax(density), density.shape) == (c + 2, c - 1, c)
    # Reciprocal axis runs from about -reciprocal_extent to +reciprocal_extent.
    k = reciprocal_grid_axis(M, rext)
    assert k[c] == 0 and k[-1] == pytest.approx((M - 1) / M * rext * 1e-10)
    with pytest.raises(ValueError, match="odd"):
        grid_structure_factor(st, 10, rext)


# ------------------------------------------------------------------------------- structures

def test_builtin_molecule_size_composition_and_asymmetry():
    st = builtin_molecule(seed=0)
    assert st.n_atoms == 2000 and st.xyz.shape == (2000, 3) and st.xyz.dtype == np.float64
    assert 30.0 <= st.max_extent() <= 60.0
    frac = {e: np.mean(st.elements == e) for e in ("C", "N", "O", "S")}
    assert 0.5 < frac["C"] < 0.75 and 0.1 < frac["N"] < 0.3 and 0.1 < frac["O"] < 0.3
    assert 0 < frac["S"] < 0.03 and sum(frac.values()) == pytest.approx(1.0)
    np.testing.assert_allclose(st.xyz.mean(axis=0), 0.0, atol=1.0)  # COM ~ centroid
    # A structure centrosymmetric about the origin has a real F; ours must not.
    # Shell 8-20 A (the SPI range); random phases would give |Im F| / |F| ~ 1/sqrt(2).
    rng = np.random.default_rng(4)
    v = rng.standard_normal((3, 400))
    s = v / np.linalg.norm(v, axis=0) * rng.uniform(1 / 20, 1 / 8, 400)
    f = structure_factor(st, s)
    assert np.linalg.norm(f.imag) / np.linalg.norm(f) > 0.4
    sym = Structure.from_atoms("sym", np.concatenate([st.xyz, -st.xyz]),
                               np.concatenate([st.elements, st.elements]))
    fs = structure_factor_direct(sym, s)
    assert np.linalg.norm(fs.imag) / np.linalg.norm(fs) < 1e-10  # the control


def test_builtin_molecule_deterministic():
    a, b, c = builtin_molecule(7, 300), builtin_molecule(7, 300), builtin_molecule(8, 300)
    assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.elements, b.elements)
    assert not np.array_equal(a.xyz, c.xyz)
    assert a.name == "builtin-seed7"


PDB_TEXT = """\
ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00  0.00           N
ATOM      2  CA  ALA A   1      11.639   6.071  -5.147  1.00  0.00           C
ATOM      3  C   ALA A   1      13.140   5.820  -5.176  1.00  0.00           C
ATOM      4  O  AALA A   1      13.760   5.630  -6.220  0.50  0.00           O
ATOM      5  O  BALA A   1      13.900   5.500  -6.300  0.50  0.00           O
ATOM      6  SG  CYS A   2      10.000   5.000  -4.000  1.00  0.00           S
ATOM      7  H   ALA A   1      10.500   6.500  -6.900  1.00  0.00           H
HETATM    8  O   HOH A 101      20.000  20.000  20.000  1.00  0.00           O
END
"""


def test_load_structure(tmp_path):
    p = tmp_path / "tiny.pdb"
    p.write_text(PDB_TEXT)
    st = load_structure(p)
    assert st.name == "tiny"
    assert sorted(st.elements.tolist()) == ["C", "C", "N", "O", "S"]
    w = np.array([14.007, 12.011, 12.011, 15.999, 32.06])
    com = (w[:, None] * (st.xyz)).sum(axis=0) / w.sum()
    np.testing.assert_allclose(com, 0.0, atol=1e-2)
    assert load_structure(p, keep_waters=True, keep_hydrogens=True).n_atoms == 7
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a structure\n")
    with pytest.raises(DatasetError, match="bad.pdb"):
        load_structure(bad)
    water = tmp_path / "water.pdb"
    water.write_text(PDB_TEXT.splitlines(keepends=True)[7] + "END\n")
    with pytest.raises(DatasetError, match="water.pdb.*found none"):
        load_structure(water)
    with pytest.raises(DatasetError, match="missing.pdb"):
        load_structure(tmp_path / "missing.pdb")


# ---------------------------------------------------------------------------------- dataset

SMALL = {"n_pixels": 16, "pixel_size_m": 6e-3, "distance_m": 0.2, "M": 15}


def _read_all(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) else None)
        out["attrs"] = dict(h5.attrs)
    return out


def _same_file(a: Path, b: Path) -> bool:
    da, db = _read_all(a), _read_all(b)
    attrs_a, attrs_b = da.pop("attrs"), db.pop("attrs")
    same_attrs = attrs_a.keys() == attrs_b.keys() and all(
        np.array_equal(attrs_a[k], attrs_b[k], equal_nan=isinstance(attrs_a[k], float))
        for k in attrs_a)
    return same_attrs and da.keys() == db.keys() and all(np.array_equal(da[k], db[k])
                                                         for k in da)


def test_dataset_layout_and_images_match_direct_sum(tmp_path, small_molecule):
    path = tmp_path / "d.h5"
    summary = ds.simulate_dataset(path, small_molecule, n_images=5, seed=3,
                                  beamstop_radius_px=1.0, eps=1e-9, **SMALL)
    assert summary["n_images"] == 5 and not (tmp_path / "d.h5.partial").exists()
    with h5py.File(path, "r") as h5:
        imgs = h5["intensities"][()]
        pos = h5["pixel_position_reciprocal"][()]
        q = h5["orientations"][()]
        mask = h5["mask"][()]
        assert imgs.shape == (5, 1, 16, 16) and imgs.dtype == np.float32
        assert pos.shape == (1, 16, 16, 3) and pos.dtype == np.float64
        assert h5["pixel_index_map"].shape == (1, 16, 16, 2)
        assert q.shape == (5, 4) and mask.shape == (1, 16, 16) and mask.dtype == np.uint8
        assert h5.attrs["reciprocal_extent"] == pytest.approx(np.linalg.norm(pos, axis=-1).max())
        assert h5.attrs["noise"] == "none" and np.isnan(h5.attrs["photons_per_image"])
        gt = h5["ground_truth"]
        assert gt["density"].shape == (15, 15, 15) and gt["intensity"].dtype == np.float32
        assert gt.attrs["M"] == 15 and gt.attrs["structure_name"] == small_molecule.name
        np.testing.assert_array_equal(gt["atoms_xyz"][()], small_molecule.xyz)
        assert gt["atoms_element"][()].astype(str).tolist() == small_molecule.elements.tolist()
    # Image i = |F(R(q_i) s_p)|^2 (architecture convention), zero behind the beamstop.
    s_a = pos.reshape(-1, 3).T * 1e-10
    for i in range(5):
        ref = np.abs(structure_factor_direct(small_molecule,
                                             quaternion_to_matrix(q[i]) @ s_a)) ** 2
        ref[mask.reshape(-1) == 0] = 0.0
        np.testing.assert_allclose(imgs[i].reshape(-1), ref, rtol=10 * F32,
                                   atol=10 * F32 * ref.max())
    assert imgs[:, 0][:, mask[0] == 0].sum() == 0 and (mask == 0).sum() == 4


def test_friedel_symmetry_of_simulated_images(tmp_path, small_molecule):
    # R' = R Ry(pi) maps the row-mirrored pixel (sx, -sy, sz) to -R s: the image of q*y(pi),
    # flipped along rows, must equal the image of q when |F(s)| = |F(-s)|.
    q = random_quaternions(3, np.random.default_rng(6))
    qy = np.array([0.0, 0.0, 1.0, 0.0])
    qq = np.concatenate([q, multiply(q, qy), multiply(q, np.array([0.0, 1.0, 0.0, 0.0]))])
    path = tmp_path / "f.h5"
    ds.simulate_dataset(path, small_molecule, n_images=9, orientations=qq, eps=1e-9, **SMALL)
    with h5py.File(path, "r") as h5:
        img = h5["intensities"][:, 0].astype(np.float64)
    scale = img.max()
    for i in range(3):
        np.testing.assert_allclose(img[3 + i, ::-1, :], img[i], atol=50 * F32 * scale)
        # Control: a rotation by pi about x does not produce the Friedel mate here.
        assert np.abs(img[6 + i, ::-1, :] - img[i]).max() > 1e-3 * scale


def test_poisson_statistics_of_fixed_image(tmp_path, small_molecule):
    K, photons = 1500, 2000.0
    q = np.tile(random_quaternions(1, np.random.default_rng(8)), (K, 1))
    path = tmp_path / "p.h5"
    ds.simulate_dataset(path, small_molecule, n_images=K, orientations=q, seed=11,
                        photons_per_image=photons, **SMALL)
    with h5py.File(path, "r") as h5:
        counts = h5["intensities"][:, 0].reshape(K, -1).astype(np.float64)
        scale = float(h5.attrs["intensity_scale"])
        assert h5.attrs["noise"] == "poisson" and h5.attrs["photons_per_image"] == photons
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    sim = ds.ImageSimulator(small_molecule, det.flat_detector_positions(
        16, SMALL["pixel_size_m"], SMALL["distance_m"],
        det.photon_energy_to_wavelength(det.DEFAULT_PHOTON_ENERGY_EV)),
        det.beamstop_mask(16, 0.0))
    lam = scale * sim.noise_free(q[:1])[0]
    good = lam > 0.5
    P = int(good.sum())
    mean = counts.mean(axis=0)
    var = counts.var(axis=0, ddof=1)
    # Sample means: K (mean - lam)^2 / lam summed over P pixels ~ chi^2_P (mean P, std sqrt(2P)).
    chi2 = np.sum(K * (mean[good] - lam[good]) ** 2 / lam[good])
    assert abs(chi2 - P) < 6 * np.sqrt(2 * P)
    # Sample variances: Var(s^2) ~ (mu4 - sigma^4) / K = (lam + 2 lam^2) / K for Poisson.
    z = np.sum(var[good] - lam[good]) / np.sqrt(np.sum((lam[good] + 2 * lam[good] ** 2) / K))
    assert abs(z) < 6
    # Control: counts at half the rate would fail the mean test.
    chi2_bad = np.sum(K * (mean[good] - 0.5 * lam[good]) ** 2 / (0.5 * lam[good]))
    assert abs(chi2_bad - P) > 6 * np.sqrt(2 * P)


def test_photon_scale_and_fluence_jitter(tmp_path, small_molecule):
    N, photons, jitter = 600, 500.0, 0.2
    path = tmp_path / "j.h5"
    summary = ds.simulate_dataset(path, small_molecule, n_images=N, seed=4,
                                  photons_per_image=photons, fluence_jitter=jitter, **SMALL)
    with h5py.File(path, "r") as h5:
        fl = h5["fluences"][()]
        totals = h5["intensities"][()].sum(axis=(1, 2, 3), dtype=np.float64)
    # Log-normal factor: mean 1, relative std `jitter` (bounds: 5 standard errors).
    assert abs(fl.mean() - 1) < 5 * jitter / np.sqrt(N)
    assert abs(fl.std(ddof=1) - jitter) < 5 * jitter / np.sqrt(2 * N) * 1.5
    assert np.all(fl > 0)
    # Expected total over random orientations = photons (128-orientation quadrature ~1 %).
    assert abs(totals.mean() - photons) < 5 * totals.std(ddof=1) / np.sqrt(N) + 0.01 * photons
    assert summary["mean_photons"] == pytest.approx(totals.mean())


def test_lognormal_fluence_sigma_keeps_mean_photons(tmp_path, small_molecule):
    """Catches a fluence whose log std is not ``sigma`` (e.g. sigma read as the relative std)
    or whose mean is not 1 (a missing ``-sigma^2/2``: the mean photons grow by
    ``exp(sigma^2/2)`` = 13 % at sigma 0.5)."""
    N, photons, sigma = 800, 400.0, 0.5
    path = tmp_path / "s.h5"
    ds.simulate_dataset(path, small_molecule, n_images=N, seed=21, photons_per_image=photons,
                        fluence_sigma=sigma, **SMALL)
    with h5py.File(path, "r") as h5:
        fl = h5["fluences"][()]
        totals = h5["intensities"][()].sum(axis=(1, 2, 3), dtype=np.float64)
        assert h5.attrs["fluence_sigma"] == pytest.approx(sigma, rel=1e-12)
        assert h5.attrs["fluence_jitter"] == pytest.approx(np.sqrt(np.expm1(sigma**2)))
    logf = np.log(fl)
    # std of a normal sample: standard error sigma / sqrt(2 (N-1)); 5 of them.
    assert abs(logf.std(ddof=1) - sigma) < 5 * sigma / np.sqrt(2 * (N - 1))
    # mean of log fluence is -sigma^2/2 (mean fluence 1).
    assert abs(logf.mean() + 0.5 * sigma**2) < 5 * sigma / np.sqrt(N)
    # Mean photons preserved: 5 standard errors of the totals plus the 1 % quadrature.
    assert abs(totals.mean() - photons) < 5 * totals.std(ddof=1) / np.sqrt(N) + 0.01 * photons
    # Control: the bias a missing -sigma^2/2 would make is outside that band.
    assert photons * (np.exp(0.5 * sigma**2) - 1) > 5 * totals.std(ddof=1) / np.sqrt(N) \
        + 0.01 * photons


def test_flat_background_and_gaps(tmp_path, small_molecule):
    """Catches a background missing, scaled by the fluence, or added to masked pixels, and
    gap pixels that are not masked or not zero."""
    N, photons, b = 400, 200.0, 0.3
    path = tmp_path / "b.h5"
    summary = ds.simulate_dataset(path, small_molecule, n_images=N, seed=5,
                                  photons_per_image=photons, fluence_sigma=0.5,
                                  background_photons_per_pixel=b, gap_rows=4, gap_cols=1,
                                  beamstop_radius_px=1.0, **SMALL)
    with h5py.File(path, "r") as h5:
        img = h5["intensities"][:, 0].astype(np.float64)
        mask = h5["mask"][0].astype(bool)
        fl = h5["fluences"][()]
        q = h5["orientations"][()]
        scale = float(h5.attrs["intensity_scale"])
        pos = h5["pixel_position_reciprocal"][()]
        assert h5.attrs["background_photons_per_pixel"] == b
        assert (h5.attrs["gap_rows"], h5.attrs["gap_cols"]) == (4, 1)
    # Gap rows 6..9 and column 7 of 16 (centred), plus the beamstop: masked and zero.
    assert not mask[6:10].any() and not mask[:, 7].any()
    assert mask[5].sum() == 15 and mask[10].sum() == 15
    assert img[:, ~mask].sum() == 0
    n_good = int(mask.sum())
    assert n_good == 16 * 16 - 4 * 16 - 12 - 0 and summary["n_good_pixels"] == n_good
    # Background = counts minus the known expected signal, averaged over the outer pixels.
    sim = ds.ImageSimulator(small_molecule, pos, mask[None].astype(np.uint8))
    signal = scale * fl[:, None] * sim.noise_free(q)
    r = np.hypot(*np.meshgrid(np.arange(16) - 7.5, np.arange(16) - 7.5, indexing="ij"))
    outer = (mask & (r > 5)).reshape(-1)
    resid = (img.reshape(N, -1) - signal)[:, outer]
    lam = (signal[:, outer] + b)
    tol = 5 * np.sqrt(lam.sum()) / resid.size
    assert abs(resid.mean() - b) < tol
    assert b > 10 * tol  # the test resolves the background
    # The background does not follow the fluence: per-image residuals do not grow with it
    # (slope 0 within 5 standard errors; a fluence-scaled background gives slope b).
    per_image = resid.mean(axis=1)
    x = fl - fl.mean()
    slope = np.dot(x, per_image) / np.dot(x, x)
    se = per_image.std(ddof=2) / np.sqrt(np.dot(x, x))
    assert abs(slope) < 5 * se and b > 10 * se
    # Mean photons: particle photons plus b per good pixel.
    totals = img.sum(axis=(1, 2))
    expected = photons + b * n_good
    assert summary["background_photons"] == pytest.approx(b * n_good)
    assert abs(totals.mean() - expected) < 5 * totals.std(ddof=1) / np.sqrt(N) + 0.01 * photons


def test_gap_mask_and_detector_preset():
    """Catches an off-centre gap and a preset whose corner resolution is not 6.5 A."""
    m = ds.gap_mask(64, gap_rows=4)[0]
    assert m.dtype == np.uint8
    assert np.flatnonzero(m.max(axis=1) == 0).tolist() == [30, 31, 32, 33]
    assert (m == 0).sum() == 4 * 64  # rows only, no columns
    m = ds.gap_mask(7, gap_rows=1, gap_cols=3)[0]
    assert np.flatnonzero(m.max(axis=1) == 0).tolist() == [3]
    assert np.flatnonzero(m.max(axis=0) == 0).tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="gap"):
        ds.gap_mask(8, gap_rows=8)
    g = ds.DETECTOR_PRESETS["photon-limited"]
    pos = det.flat_detector_positions(g["n_pixels"], g["pixel_size_m"], g["distance_m"],
                                      det.photon_energy_to_wavelength(g["photon_energy_ev"]))
    _edge, corner = det.resolution_angstrom(pos)
    assert corner == pytest.approx(6.48, abs=0.01) and g["beamstop_radius_px"] == 3.0


class _ThreadComm:
    """Two in-process "ranks" (threads) sharing gather/bcast, to emulate MPI without mpiexec."""

    def __init__(self, rank: int, size: int, shared: dict, barrier: threading.Barrier):
        self.rank, self.size, self._shared, self._barrier = rank, size, shared, barrier

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def gather(self, obj, root=0):
        self._shared[self.rank] = obj
        self._barrier.wait()
        out = [self._shared[r] for r in range(self.size)] if self.rank == root else None
        self._barrier.wait()
        return out

    def bcast(self, obj, root=0):
        if self.rank == root:
            self._shared["bcast"] = obj
        self._barrier.wait()
        out = self._shared["bcast"]
        self._barrier.wait()
        return out


def test_reproducible_for_seed_batch_workers_and_ranks(tmp_path, small_molecule):
    kw = dict(n_images=23, photons_per_image=300.0, fluence_sigma=0.3, seed=9,
              background_photons_per_pixel=0.2, gap_rows=2, **SMALL)
    a, b, c, d = (tmp_path / f"{x}.h5" for x in "abcd")
    ds.simulate_dataset(a, small_molecule, **kw)
    ds.simulate_dataset(b, small_molecule, batch=4, workers=2, **kw)
    assert _same_file(a, b)
    ds.simulate_dataset(c, small_molecule, **{**kw, "seed": 10})
    assert not _same_file(a, c)
    # Two emulated ranks with uneven batches write the same file as one rank.
    shared, barrier, errors = {}, threading.Barrier(2), []

    def rank_main(r):
        try:
            ds.simulate_dataset(d, small_molecule, comm=_ThreadComm(r, 2, shared, barrier),
                                batch=5, **kw)
        except BaseException as exc:  # noqa: BLE001 (surfaced below)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _same_file(a, d)


def test_invalid_parameters_and_atomic_write(tmp_path, small_molecule, monkeypatch):
    p = tmp_path / "x.h5"
    for bad, match in (({"photons_per_image": -1.0}, "photons_per_image"),
                       ({"M": 16}, "M must be odd"), ({"n_images": 0}, "n_images"),
                       ({"beamstop_radius_px": 9.0}, "beamstop"),
                       ({"fluence_jitter": 0.1, "fluence_sigma": 0.1}, "not both"),
                       ({"fluence_sigma": -0.1}, "fluence_sigma"),
                       ({"background_photons_per_pixel": 0.1}, "needs photons_per_image"),
                       ({"gap_rows": 16}, "gap_rows"),
                       ({"orientations": np.zeros((2, 4))}, "orientations")):
        kw = {**dict(n_images=3, **SMALL), **bad}
        with pytest.raises(ConfigError, match=match):
            ds.simulate_dataset(p, small_molecule, **kw)
    with pytest.raises(OutputError, match="does not exist"):
        ds.simulate_dataset(tmp_path / "no" / "x.h5", small_molecule, n_images=2, **SMALL)
    # A failure mid-way leaves neither the final file nor the temporary one.
    calls = {"n": 0}
    original = ds.ImageSimulator.images

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ds.ImageSimulator, "images", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ds.simulate_dataset(p, small_molecule, n_images=6, batch=2, **SMALL)
    assert not p.exists() and not (tmp_path / "x.h5.partial").exists()


# ---------------------------------------------------------------------------------- command

def test_command_writes_dataset_and_plot(tmp_path, monkeypatch, capsys):
    from spinifel.commands import simulate as cmd
    from spinifel.parallel.context import ParallelContext

    monkeypatch.setattr(ParallelContext, "from_world", classmethod(lambda cls: cls.serial()))
    parser = argparse.ArgumentParser()
    cmd.add_args(parser)
    out = tmp_path / "c.h5"
    args = parser.parse_args(["--out", str(out), "--n-images", "4", "--pixels", "16",
                              "--pixel-size", "6e-3", "--M", "15", "--photons", "1000",
                              "--beamstop", "1"])
    assert cmd.main(args) == 0
    text = capsys.readouterr().out
    assert "Simulated 4 images of builtin-seed0" in text and str(out) in text
    assert out.exists() and Path(str(out) + ".patterns.png").stat().st_size > 1000
    with h5py.File(out, "r") as h5:
        assert h5["intensities"].shape == (4, 1, 16, 16) and h5.attrs["photons_per_image"] == 1000
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x.h5", "--pdb", "a.pdb", "--builtin"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x.h5", "--jitter", "0.1", "--fluence-sigma", "0.1"])
    # The preset fills the geometry; an explicit flag still wins.
    geo = cmd.geometry_from_args(parser.parse_args(
        ["--out", "x.h5", "--detector", "photon-limited", "--beamstop", "14"]))
    assert geo == {**ds.DETECTOR_PRESETS["photon-limited"], "beamstop_radius_px": 14.0}
    geo = cmd.geometry_from_args(parser.parse_args(["--out", "x.h5"]))
    assert geo == ds.DETECTOR_PRESETS["default"]
    args = parser.parse_args(["--out", str(tmp_path / "g.h5"), "--n-images", "3",
                              "--pixels", "16", "--pixel-size", "6e-3", "--M", "15",
                              "--photons", "100", "--fluence-sigma", "0.5",
                              "--background", "0.1", "--gap-rows", "2", "--no-plot"])
    assert cmd.main(args) == 0
    assert "background" in capsys.readouterr().out
    with h5py.File(tmp_path / "g.h5", "r") as h5:
        assert h5.attrs["detector"] == "default" and h5.attrs["gap_rows"] == 2
        assert h5.attrs["fluence_sigma"] == 0.5 and h5["mask"][0, 7:9].sum() == 0


# --------------------------------------------------------------------------------------- MPI

@pytest.mark.mpi
def test_mpi_file_identical_to_serial(tmp_path_factory, small_molecule):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    base = Path(comm.bcast(str(tmp_path_factory.mktemp("mpi")) if comm.rank == 0 else None))
    kw = dict(n_images=17, photons_per_image=300.0, seed=2, batch=3, **SMALL)
    if comm.rank == 0:
        ds.simulate_dataset(base / "serial.h5", small_molecule, **kw)
    summary = ds.simulate_dataset(base / "par.h5", small_molecule, comm=comm, **kw)
    assert summary["n_ranks"] == comm.size
    same = _same_file(base / "serial.h5", base / "par.h5") if comm.rank == 0 else None
    assert comm.bcast(same, root=0)
