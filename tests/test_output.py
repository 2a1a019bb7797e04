"""Tests of spinifel.io.output and spinifel.io.mrc: atomic writes, output directory checks,
result.h5 round trip, metrics.json, and MRC files checked with the independent mrcfile."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest

import spinifel
from spinifel.errors import DatasetError, OutputError
from spinifel.io import mrc as mrc_module
from spinifel.io import output as output_module
from spinifel.io.output import (
    atomic_write,
    prepare_output_dir,
    read_mrc,
    read_result,
    write_metrics,
    write_mrc,
    write_result,
)

F32_EPS = float(np.finfo(np.float32).eps)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# ----------------------------------------------------------------------------- atomic_write


def test_atomic_write_creates_file_and_no_temp(tmp_path):
    seen = []

    def fn(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"new")

    out = atomic_write(tmp_path / "a.bin", fn)
    assert out == tmp_path / "a.bin" and out.read_bytes() == b"new"
    assert seen[0].parent == tmp_path and seen[0].name == f".a.bin.tmp-{os.getpid()}"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "result.h5"
    target.write_bytes(b"old result")

    def fn(tmp: Path) -> None:
        tmp.write_bytes(b"half written")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, fn)
    assert target.read_bytes() == b"old result"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_without_old_file(tmp_path):
    def fn(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        raise KeyError("k")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "m.json", fn)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_os_error_becomes_output_error(tmp_path):
    def fn(tmp: Path) -> None:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(OutputError, match=r"m\.json: cannot write"):
        atomic_write(tmp_path / "m.json", fn)
    with pytest.raises(OutputError, match="cannot write"):  # write_fn that creates nothing
        atomic_write(tmp_path / "n.json", lambda t: None)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- prepare_output_dir


def test_prepare_output_dir_creates_parents(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # probe removed


def test_prepare_output_dir_refuses_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        prepare_output_dir(f)
    with pytest.raises(OutputError, match="cannot create output directory"):
        prepare_output_dir(f / "sub")


def test_prepare_output_dir_existing_result(tmp_path):
    (tmp_path / "result.h5").write_bytes(b"x")
    with pytest.raises(OutputError) as e:
        prepare_output_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "already holds result.h5" in str(e.value)
    assert prepare_output_dir(tmp_path, overwrite=True) == tmp_path
    assert prepare_output_dir(tmp_path, resume=True) == tmp_path
    assert (tmp_path / "result.h5").read_bytes() == b"x"


def test_prepare_output_dir_not_writable_probe(tmp_path, monkeypatch):
    # The probe file is what decides (root ignores permission bits, so simulate the
    # failing open on any machine; the chmod variant below runs when not root).
    def deny(path, mode="r", *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(output_module, "open", deny, raising=False)
    with pytest.raises(OutputError, match="output directory is not writable: Permission denied"):
        prepare_output_dir(tmp_path / "ro")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permission bits")
def test_prepare_output_dir_not_writable_chmod(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            prepare_output_dir(ro)
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- result.h5


def _result_arrays(m: int = 5, n: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, 4))
    return dict(
        density=rng.standard_normal((m, m, m)),
        intensity=rng.random((m, m, m)).astype(np.float32),
        autocorrelation=rng.standard_normal((m, m, m)),
        support=rng.random((m, m, m)) > 0.5,
        orientations=q / np.linalg.norm(q, axis=1, keepdims=True),
    )


def test_write_read_result_round_trip(tmp_path):
    arrays = _result_arrays()
    config = '[run]\nseed = 7\nname = "x"\n'
    path = write_result(
        tmp_path, **arrays, voxel_size_angstrom=2.5, reciprocal_extent_inv_angstrom=0.2,
        generation=3, n_ranks=2, config_toml=config,
        extra_attrs={"note": "ok", "lambdas": [1e-3, 1e-2], "best": np.float64(0.5)},
    )
    assert path == tmp_path / "result.h5"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["density.mrc", "intensity.mrc", "result.h5"]
    r = read_result(tmp_path)
    for k in ("density", "intensity", "autocorrelation"):
        assert r[k].dtype == np.float32
        np.testing.assert_array_equal(r[k], arrays[k].astype(np.float32))
    assert r["support"].dtype == np.uint8
    np.testing.assert_array_equal(r["support"], arrays["support"].astype(np.uint8))
    assert r["orientations"].dtype == np.float64
    np.testing.assert_array_equal(r["orientations"], arrays["orientations"])
    assert r["voxel_size_angstrom"] == 2.5 and r["reciprocal_extent_inv_angstrom"] == 0.2
    assert r["generation"] == 3 and r["n_ranks"] == 2
    assert r["spinifel_version"] == spinifel.__version__
    assert r["config"] == config
    assert r["note"] == "ok" and json.loads(r["lambdas"]) == [1e-3, 1e-2] and r["best"] == 0.5
    # Reading the file path directly is the same.
    assert read_result(path)["generation"] == 3

    # The MRC maps: density at the real-space voxel, intensity at 2*extent/M.
    with mrcfile.open(tmp_path / "density.mrc") as m:
        np.testing.assert_array_equal(m.data.transpose(2, 1, 0),
                                      arrays["density"].astype(np.float32))
        assert float(m.voxel_size.x) == pytest.approx(2.5, rel=F32_EPS)
    with mrcfile.open(tmp_path / "intensity.mrc") as m:
        assert float(m.voxel_size.z) == pytest.approx(2 * 0.2 / 5, rel=2 * F32_EPS)


def test_write_result_without_mrc_and_overwrite(tmp_path):
    a = _result_arrays(seed=1)
    kw = dict(voxel_size_angstrom=1.0, reciprocal_extent_inv_angstrom=0.5, n_ranks=1,
              config_toml="", write_mrc=False)
    write_result(tmp_path, **a, generation=1, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.h5"]
    b = _result_arrays(seed=2)
    write_result(tmp_path, **b, generation=2, **kw)
    r = read_result(tmp_path)
    assert r["generation"] == 2
    np.testing.assert_array_equal(r["density"], b["density"].astype(np.float32))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "change,msg",
    [
        ({"intensity": np.zeros((4, 4, 4))}, "intensity has shape (4, 4, 4), expected (5, 5, 5)"),
        ({"support": np.zeros((5, 5, 4))}, "support must be a cubic (M, M, M) array"),
        ({"density": np.zeros((5, 5))}, "density must be a cubic (M, M, M) array"),
        ({"orientations": np.zeros((6, 3))}, "orientations must have shape (N, 4), found (6, 3)"),
        ({"autocorrelation": np.zeros((5, 5, 5), complex)}, "autocorrelation must be real"),
        ({"voxel_size_angstrom": 0.0}, "voxel_size_angstrom must be finite and > 0"),
        ({"extra_attrs": {"config": "x"}}, "extra_attrs may not redefine ['config']"),
        ({"extra_attrs": {"obj": object()}}, "attribute 'obj' has unsupported type object"),
    ],
)
def test_write_result_validation(tmp_path, change, msg):
    kw = dict(_result_arrays(), voxel_size_angstrom=1.0, reciprocal_extent_inv_angstrom=0.5,
              generation=0, n_ranks=1, config_toml="")
    kw.update(change)
    with pytest.raises(ValueError) as e:
        write_result(tmp_path, **kw)
    assert msg in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_read_result_errors(tmp_path):
    with pytest.raises(DatasetError, match="result file not found"):
        read_result(tmp_path)
    with h5py.File(tmp_path / "result.h5", "w") as f:
        f.create_dataset("density", data=np.zeros((3, 3, 3), np.float32))
    with pytest.raises(DatasetError, match=r"result\.h5:intensity: required dataset is missing"):
        read_result(tmp_path)
    (tmp_path / "result.h5").write_text("garbage")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        read_result(tmp_path / "result.h5")


# ----------------------------------------------------------------------------- metrics.json


def test_write_metrics_converts_numpy(tmp_path):
    metrics = {
        "fsc": np.array([1.0, 0.5, np.nan], dtype=np.float32),
        "n": np.int64(7),
        "flag": np.bool_(True),
        "nested": {"r": np.float32(0.25), "inf": float("inf"), "t": (1, 2)},
        "z": np.complex128(1 - 2j),
        "p": Path("/x/y"),
    }
    p = write_metrics(tmp_path, metrics)
    assert p == tmp_path / "metrics.json"
    got = json.loads(p.read_text())
    assert got == {
        "fsc": [1.0, 0.5, None], "n": 7, "flag": True,
        "nested": {"r": 0.25, "inf": None, "t": [1, 2]},
        "z": {"real": 1.0, "imag": -2.0}, "p": "/x/y",
    }
    with pytest.raises(ValueError, match="cannot convert object to JSON"):
        write_metrics(tmp_path, {"bad": object()})
    assert json.loads(p.read_text())["n"] == 7  # the earlier file is untouched
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- MRC


def test_mrc_header_is_1024_bytes():
    assert mrc_module._HEADER.itemsize == 1024


def test_mrc_round_trip_with_mrcfile(tmp_path):
    # Non-cubic, so a wrong axis order cannot pass.
    rng = np.random.default_rng(3)
    vol = rng.standard_normal((3, 4, 5)).astype(np.float64)
    p = tmp_path / "v.mrc"
    write_mrc(p, vol, 1.7)
    assert p.stat().st_size == 1024 + 4 * vol.size
    assert mrcfile.validate(str(p), print_file=io.StringIO()) is True
    with mrcfile.open(p) as m:
        h = m.header
        assert (int(h.nx), int(h.ny), int(h.nz)) == (3, 4, 5)
        assert m.data.shape == (5, 4, 3) and m.data.dtype == np.float32
        for ix, iy, iz in [(0, 0, 0), (2, 1, 4), (1, 3, 2)]:
            assert m.data[iz, iy, ix] == np.float32(vol[ix, iy, iz])
        np.testing.assert_array_equal(m.data, vol.astype(np.float32).transpose(2, 1, 0))
        assert int(h.mode) == 2 and int(h.nversion) == 20140
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3)
        assert (int(h.mx), int(h.my), int(h.mz)) == (3, 4, 5)
        assert (int(h.nxstart), int(h.nystart), int(h.nzstart)) == (-1, -2, -2)
        np.testing.assert_allclose([h.cella.x, h.cella.y, h.cella.z], [5.1, 6.8, 8.5],
                                   rtol=F32_EPS)
        assert [float(h.cellb.alpha), float(h.cellb.beta), float(h.cellb.gamma)] == [90.0] * 3
        assert bytes(h.map) == b"MAP " and bytes(h.machst.tobytes()) == b"\x44\x44\x00\x00"
        v32 = vol.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose([h.dmin, h.dmax, h.dmean, h.rms],
                                   [v32.min(), v32.max(), v32.mean(), v32.std()],
                                   rtol=4 * F32_EPS, atol=4 * F32_EPS)
        assert float(m.voxel_size.y) == pytest.approx(1.7, rel=F32_EPS)
    back, voxel = read_mrc(p)
    np.testing.assert_array_equal(back, vol.astype(np.float32))
    assert voxel == pytest.approx(1.7, rel=F32_EPS)


def test_read_mrc_of_file_written_by_mrcfile(tmp_path):
    rng = np.random.default_rng(4)
    vol = rng.standard_normal((4, 3, 2)).astype(np.float32)  # [x, y, z]
    p = tmp_path / "other.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.ascontiguousarray(vol.transpose(2, 1, 0)))
        m.voxel_size = 0.9
        m.set_extended_header(np.zeros(16, dtype=np.uint8))  # exercises nsymbt
    back, voxel = read_mrc(p)
    np.testing.assert_array_equal(back, vol)
    assert voxel == pytest.approx(0.9, rel=F32_EPS)


def test_read_mrc_with_permuted_axes(tmp_path):
    # A file whose columns run along y, rows along z, sections along x (mapc,r,s = 2,3,1).
    rng = np.random.default_rng(5)
    vol = rng.standard_normal((2, 3, 4)).astype(np.float32)  # [x, y, z]
    stored = vol.transpose(0, 2, 1)  # [section = x, row = z, column = y]
    p = tmp_path / "perm.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.ascontiguousarray(stored))
        m.header.mapc, m.header.mapr, m.header.maps = 2, 3, 1
        m.header.mx, m.header.my, m.header.mz = 2, 3, 4
        m.header.cella = (2.0, 3.0, 4.0)
    back, voxel = read_mrc(p)
    np.testing.assert_array_equal(back, vol)
    assert voxel == 1.0


def test_mrc_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected a non-empty 3D array, found shape \(2, 2\)"):
        write_mrc(tmp_path / "a.mrc", np.zeros((2, 2)), 1.0)
    with pytest.raises(ValueError, match="expected a real array, found dtype complex128"):
        write_mrc(tmp_path / "a.mrc", np.zeros((2, 2, 2), complex), 1.0)
    with pytest.raises(ValueError, match="expected a finite value > 0, found -1"):
        write_mrc(tmp_path / "a.mrc", np.zeros((2, 2, 2)), -1)
    with pytest.raises(DatasetError, match="MRC file not found"):
        read_mrc(tmp_path / "none.mrc")
    p = tmp_path / "t.mrc"
    write_mrc(p, np.ones((3, 3, 3)), 1.0)
    raw = p.read_bytes()
    p.write_bytes(raw[:-8])
    with pytest.raises(DatasetError, match=r"truncated: expected 1132 bytes, found 1124"):
        read_mrc(p)
    p.write_bytes(raw[:100])
    with pytest.raises(DatasetError, match="expected an MRC header of 1024 bytes, found 100"):
        read_mrc(p)
    p.write_bytes(raw[:208] + b"XXXX" + raw[212:])
    with pytest.raises(DatasetError, match="expected 'MAP ' at byte 208"):
        read_mrc(p)
    p.write_bytes(raw[:12] + np.int32(1).tobytes() + raw[16:])
    with pytest.raises(DatasetError, match="expected MRC mode 2 \\(float32\\), found mode 1"):
        read_mrc(p)
