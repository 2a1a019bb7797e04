"""Tests of spinifel.io.dataset: layouts, clip/bin, sharding, and every bad-dataset case."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import flat_detector_positions, write_dataset
from spinifel.errors import ConfigError, DatasetError
from spinifel.io.dataset import (
    DetectorGeometry,
    ImageShard,
    inspect_dataset,
    read_geometry,
    read_shard,
    shard_bounds,
)

F32_EPS = np.finfo(np.float32).eps
F64_EPS = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------- helpers


def _reference_clip_bin(data: dict, clip: int, binning: int):
    """Clip and bin with explicit Python loops (independent of the reshape code)."""
    pos, mask, inten = data["positions"], data["mask"], data["intensities"].astype(np.float64)
    n, P, H, W = inten.shape
    f = 2**binning
    Hc, Wc = H - 2 * clip, W - 2 * clip
    hb, wb = Hc // f, Wc // f
    ref_pos = np.zeros((P, hb, wb, 3))
    ref_mask = np.zeros((P, hb, wb), dtype=bool)
    ref_img = np.zeros((n, P, hb, wb))
    for p in range(P):
        for i in range(hb):
            for j in range(wb):
                rows = range(clip + i * f, clip + (i + 1) * f)
                cols = range(clip + j * f, clip + (j + 1) * f)
                good = True
                acc = np.zeros(3)
                tot = np.zeros(n)
                for r in rows:
                    for c in cols:
                        acc += pos[p, r, c]
                        good = good and bool(mask[p, r, c])
                        tot += inten[:, p, r, c]
                ref_pos[p, i, j] = acc / f**2
                ref_mask[p, i, j] = good
                ref_img[:, p, i, j] = tot if good else 0.0
    return ref_pos.reshape(-1, 3).T, ref_mask.reshape(-1), ref_img.reshape(n, -1)


def _h5(path: Path, **datasets) -> Path:
    """Write the given datasets (name=array) to a fresh HDF5 file."""
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def _edit(path: Path, name: str, data) -> None:
    """Replace dataset ``name`` (or delete it when ``data`` is None)."""
    with h5py.File(path, "a") as f:
        if name in f:
            del f[name]
        if data is not None:
            f.create_dataset(name, data=data)


# ----------------------------------------------------------------------------- reading


def test_inspect_reports_structure(make_dataset):
    d = make_dataset(n_images=5, panels=2, H=6, W=4, with_ground_truth=True,
                     intensity_dtype="uint16")
    info = inspect_dataset(d["path"])
    assert info.n_images == 5
    assert info.panel_shape == (2, 6, 4)
    assert info.intensity_dtype == "uint16"
    assert info.position_layout == "last"
    assert info.has_orientations and info.has_mask and info.has_ground_truth
    assert info.attrs["n_images"] == 5 and info.attrs["det_shape"] == [2, 6, 4]
    d2 = make_dataset("b.h5", with_mask=False, with_orientations=False, layout="first")
    info2 = inspect_dataset(d2["path"])
    assert info2.position_layout == "first"
    assert not (info2.has_orientations or info2.has_mask or info2.has_ground_truth)


def test_both_position_layouts_give_the_same_geometry(make_dataset):
    a = make_dataset("last.h5", panels=2, H=8, W=6, layout="last", rng=3)
    b = make_dataset("first.h5", panels=2, H=8, W=6, layout="first", rng=3)
    ga, gb = read_geometry(a["path"]), read_geometry(b["path"])
    assert isinstance(ga, DetectorGeometry)
    assert ga.positions.shape == (3, 96) and ga.positions.dtype == np.float64
    np.testing.assert_array_equal(ga.positions, gb.positions)
    np.testing.assert_array_equal(ga.mask, gb.mask)
    # Flattened in (panel, row, col) C order, straight from the written truth.
    np.testing.assert_array_equal(ga.positions, a["positions"].reshape(-1, 3).T)
    np.testing.assert_array_equal(ga.mask, a["mask"].reshape(-1))
    assert ga.shape == (2, 8, 6)
    ref_extent = max(np.linalg.norm(a["positions"][p, r, c]) for p in range(2)
                     for r in range(8) for c in range(6))
    assert abs(ga.reciprocal_extent - ref_extent) <= 4 * F64_EPS * ref_extent


def test_ambiguous_layout_prefers_skopi(tmp_path):
    # n_panels == 3 and W == 3: both (3, H, 3, 3) readings fit; skopi's last-axis wins.
    pos = flat_detector_positions(3, 4, 3)
    p = _h5(tmp_path / "amb.h5", intensities=np.ones((2, 3, 4, 3), np.float32),
            pixel_position_reciprocal=pos[:, :, :, :])
    assert pos.shape == (3, 4, 3, 3)
    assert inspect_dataset(p).position_layout == "last"
    g = read_geometry(p)
    np.testing.assert_array_equal(g.positions, pos.reshape(-1, 3).T)


@pytest.mark.parametrize("clip,binning", [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (2, 1)])
def test_clip_and_bin_match_hand_computation(make_dataset, clip, binning):
    # Fewer bad pixels for bigger blocks, so that both good and bad binned pixels occur.
    d = make_dataset(n_images=3, panels=2, H=8, W=8, rng=7, mask_fraction=0.15 / 4**binning,
                     intensity_dtype="int32")
    ref_pos, ref_mask, ref_img = _reference_clip_bin(d, clip, binning)
    assert ref_mask.any() and not ref_mask.all()
    g = read_geometry(d["path"], clip=clip, binning=binning)
    f = 2**binning
    assert g.shape == (2, (8 - 2 * clip) // f, (8 - 2 * clip) // f)
    np.testing.assert_allclose(g.positions, ref_pos, rtol=8 * F64_EPS, atol=0)
    np.testing.assert_array_equal(g.mask, ref_mask)
    assert abs(g.reciprocal_extent - np.linalg.norm(ref_pos, axis=0).max()) \
        <= 8 * F64_EPS * g.reciprocal_extent
    s = read_shard(d["path"], 0, 3, clip=clip, binning=binning, geometry=g)
    assert s.images.dtype == np.float32 and s.images.shape == ref_img.shape
    # Integer counts summed in float32 are exact below 2**24.
    np.testing.assert_array_equal(s.images, ref_img.astype(np.float32))
    # Reading the geometry internally gives the same shard.
    np.testing.assert_array_equal(read_shard(d["path"], 0, 3, clip=clip, binning=binning).images,
                                  s.images)


def test_tiny_binning_by_hand(tmp_path):
    # One 2x4 panel, one 2x2 binning pass -> two binned pixels, values worked out by hand.
    img = np.array([[[[1, 2, 3, 4], [5, 6, 7, 8]]]], dtype=np.float64)
    pos = np.zeros((1, 2, 4, 3))
    pos[0, :, :, 0] = [[1, 2, 3, 4], [5, 6, 7, 8]]
    pos[0, :, :, 2] = 1.0
    mask = np.array([[[1, 1, 1, 0], [1, 1, 1, 1]]], dtype=np.int8)
    p = _h5(tmp_path / "t.h5", intensities=img, pixel_position_reciprocal=pos, mask=mask)
    g = read_geometry(p, binning=1)
    np.testing.assert_array_equal(g.positions, [[3.5, 5.5], [0, 0], [1, 1]])
    np.testing.assert_array_equal(g.mask, [True, False])  # 2nd block has one bad pixel
    s = read_shard(p, 0, 1, binning=1, geometry=g)
    np.testing.assert_array_equal(s.images, [[1 + 2 + 5 + 6, 0]])
    assert g.reciprocal_extent == pytest.approx(np.hypot(5.5, 1.0), rel=4 * F64_EPS)


def test_integer_intensities_become_float32(make_dataset):
    d = make_dataset(intensity_dtype="uint8", with_mask=False)
    s = read_shard(d["path"], 2, 5)
    assert s.images.dtype == np.float32
    np.testing.assert_array_equal(s.images, d["intensities"][2:5].reshape(3, -1))


def test_orientations_both_shapes(make_dataset):
    for shape in ("n14", "n4"):
        d = make_dataset(f"{shape}.h5", orientation_shape=shape)
        s = read_shard(d["path"], 1, 6)
        assert s.orientations.shape == (5, 4) and s.orientations.dtype == np.float64
        np.testing.assert_allclose(s.orientations, d["orientations"][1:6], rtol=0,
                                   atol=4 * F64_EPS)
    d = make_dataset("none.h5", with_orientations=False)
    assert read_shard(d["path"], 0, 2).orientations is None


def test_masked_pixels_are_zero_and_not_checked(make_dataset):
    d = make_dataset(with_mask=True, mask_fraction=0.3, rng=5)
    bad = np.flatnonzero(~d["mask"].reshape(-1))
    assert bad.size > 0
    inten = d["intensities"].copy().reshape(8, -1)
    inten[:, bad[0]] = np.nan
    inten[:, bad[-1]] = -3
    _edit(d["path"], "intensities", inten.reshape(d["intensities"].shape))
    s = read_shard(d["path"], 0, 8)
    assert np.all(s.images[:, bad] == 0)
    good = d["mask"].reshape(-1)
    np.testing.assert_array_equal(s.images[:, good], inten[:, good])


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    "n,p,expected",
    [
        (8, 1, [(0, 8)]),
        (8, 2, [(0, 4), (4, 8)]),
        (8, 3, [(0, 3), (3, 6), (6, 8)]),
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
        (5, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    ],
)
def test_shard_bounds(n, p, expected):
    assert [shard_bounds(n, p, r) for r in range(p)] == expected


def test_shard_bounds_more_ranks_than_images():
    with pytest.raises(DatasetError) as e:
        shard_bounds(3, 4, 0, path="x.h5")
    msg = str(e.value)
    assert "x.h5" in msg and "3 images cannot be shared by 4 ranks" in msg
    assert "need at least one image per rank" in msg


def test_union_of_shards_equals_full_read(make_dataset):
    d = make_dataset(n_images=7, panels=2, H=6, W=6, rng=11)
    full = read_shard(d["path"], 0, 7, clip=1, binning=1)
    assert isinstance(full, ImageShard) and full.images.shape == (7, 2 * 2 * 2)
    for n_ranks in (1, 2, 3):
        g = read_geometry(d["path"], clip=1, binning=1)
        parts = [read_shard(d["path"], *shard_bounds(7, n_ranks, r), clip=1, binning=1,
                            geometry=g) for r in range(n_ranks)]
        assert [(s.start, s.stop) for s in parts] == [shard_bounds(7, n_ranks, r)
                                                       for r in range(n_ranks)]
        np.testing.assert_array_equal(np.concatenate([s.images for s in parts]), full.images)
        np.testing.assert_array_equal(np.concatenate([s.orientations for s in parts]),
                                      full.orientations)


def test_read_shard_reads_only_its_rows(make_dataset):
    # A NaN in row 6 does not concern the shard [0, 4): only each rank's rows are checked.
    d = make_dataset(with_mask=False)
    inten = d["intensities"].copy()
    inten[6, 0, 3, 3] = np.nan
    _edit(d["path"], "intensities", inten)
    s = read_shard(d["path"], 0, 4)
    np.testing.assert_array_equal(s.images, inten[:4].reshape(4, -1))
    with pytest.raises(DatasetError, match="image 6 "):
        read_shard(d["path"], 4, 8)


@pytest.mark.mpi
def test_mpi_two_rank_shards_union_equals_serial_read(tmp_path):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = None
    if comm.rank == 0:
        path = str(write_dataset(tmp_path / "mpi.h5", n_images=9, panels=2, H=8, W=8,
                                 rng=21)["path"])
    path = comm.bcast(path, root=0)
    start, stop = shard_bounds(9, comm.size, comm.rank, path=path)
    mine = read_shard(path, start, stop, clip=1, binning=1)
    assert mine.images.shape[0] == stop - start
    gathered = comm.allgather((mine.start, mine.images, mine.orientations))
    serial = read_shard(path, 0, 9, clip=1, binning=1)
    assert [g[0] for g in gathered] == [shard_bounds(9, comm.size, r)[0] for r in range(comm.size)]
    np.testing.assert_array_equal(np.concatenate([g[1] for g in gathered]), serial.images)
    np.testing.assert_array_equal(np.concatenate([g[2] for g in gathered]), serial.orientations)
    comm.barrier()


# ----------------------------------------------------------------------------- bad datasets


def _raises(fn, *needles) -> str:
    with pytest.raises(DatasetError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_missing_file(tmp_path):
    _raises(lambda: inspect_dataset(tmp_path / "nope.h5"), "nope.h5", "file not found")


def test_directory_instead_of_file(tmp_path):
    _raises(lambda: inspect_dataset(tmp_path), str(tmp_path), "expected an HDF5 file")


def test_not_hdf5(tmp_path):
    p = tmp_path / "text.h5"
    p.write_text("this is not HDF5\n" * 10)
    _raises(lambda: read_geometry(p), "text.h5", "not a readable HDF5 file")


def test_truncated_hdf5(make_dataset):
    d = make_dataset(n_images=64, H=16, W=16, with_mask=False, with_orientations=False)
    p = d["path"]
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 3])
    # Either the open or the read fails; both must be a DatasetError naming the file.
    _raises(lambda: read_shard(p, 0, 64), "data.h5", "truncated or corrupt")


@pytest.mark.parametrize("name", ["intensities", "pixel_position_reciprocal"])
def test_missing_required_dataset(make_dataset, name):
    d = make_dataset()
    _edit(d["path"], name, None)
    _raises(lambda: inspect_dataset(d["path"]), f"data.h5:{name}", "required dataset is missing")


def test_wrong_rank_intensities(make_dataset):
    d = make_dataset()
    _edit(d["path"], "intensities", d["intensities"][:, 0])
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:intensities", "expected rank 4",
            "found shape (8, 8, 8)")


def test_wrong_rank_positions(make_dataset):
    d = make_dataset()
    _edit(d["path"], "pixel_position_reciprocal", d["positions"][0])
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:pixel_position_reciprocal",
            "expected rank 4", "found shape (8, 8, 3)")


def test_positions_without_axis_of_three(make_dataset):
    d = make_dataset()
    _edit(d["path"], "pixel_position_reciprocal", np.zeros((1, 8, 8, 2)))
    _raises(lambda: inspect_dataset(d["path"]), "pixel_position_reciprocal",
            "expected one axis of length 3", "found shape (1, 8, 8, 2)")


@pytest.mark.parametrize("layout", ["last", "first"])
def test_detector_shape_mismatch(make_dataset, layout):
    d = make_dataset(layout=layout)
    pos = flat_detector_positions(1, 8, 6)
    _edit(d["path"], "pixel_position_reciprocal",
          pos if layout == "last" else np.moveaxis(pos, -1, 0))
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:pixel_position_reciprocal",
            "detector shape (1, 8, 6)", "(n_panels, H, W) = (1, 8, 8)")


def test_mask_shape_mismatch(make_dataset):
    d = make_dataset()
    _edit(d["path"], "mask", np.ones((1, 8, 7), np.uint8))
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:mask", "expected shape", "(1, 8, 8)",
            "found (1, 8, 7)")


def test_mask_float_dtype(make_dataset):
    d = make_dataset()
    _edit(d["path"], "mask", np.ones((1, 8, 8), np.float32))
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:mask", "integer or bool", "float32")


@pytest.mark.parametrize("shape,found", [((7, 4), "found (7, 4)"), ((8, 3), "found (8, 3)"),
                                         ((8, 2, 4), "found (8, 2, 4)")])
def test_orientations_shape_mismatch(make_dataset, shape, found):
    d = make_dataset()
    _edit(d["path"], "orientations", np.ones(shape))
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:orientations",
            "expected shape (8, 4) or (8, 1, 4)", found)


def test_orientations_not_unit(make_dataset):
    d = make_dataset(orientation_shape="n4")
    q = d["orientations"].copy()
    q[5] *= 2
    _edit(d["path"], "orientations", q)
    read_shard(d["path"], 0, 5)  # rows before the bad one are fine
    _raises(lambda: read_shard(d["path"], 0, 8), "data.h5:orientations", "row 5",
            "unit quaternion", "found norm 2.0")


def test_index_map_shape_mismatch(make_dataset):
    d = make_dataset()
    _edit(d["path"], "pixel_index_map", np.zeros((1, 8, 8), np.int64))
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:pixel_index_map",
            "expected shape (1, 8, 8, 2)", "found (1, 8, 8)")


@pytest.mark.parametrize("name", ["intensities", "pixel_position_reciprocal", "orientations"])
def test_non_numeric_dtype(make_dataset, name):
    d = make_dataset()
    with h5py.File(d["path"], "r") as f:
        shape = f[name].shape
    _edit(d["path"], name, np.full(shape, b"x", dtype="S1"))
    _raises(lambda: inspect_dataset(d["path"]), f"data.h5:{name}",
            "expected a real integer or float dtype", "found |S1")


def test_complex_intensities_rejected(make_dataset):
    d = make_dataset()
    _edit(d["path"], "intensities", d["intensities"].astype(np.complex64))
    _raises(lambda: inspect_dataset(d["path"]), "data.h5:intensities", "found complex64")


def test_zero_images(tmp_path):
    p = _h5(tmp_path / "empty.h5", intensities=np.zeros((0, 1, 4, 4), np.float32),
            pixel_position_reciprocal=flat_detector_positions(1, 4, 4))
    _raises(lambda: inspect_dataset(p), "empty.h5:intensities", "expected at least 1 image",
            "(0, 1, 4, 4)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_image(make_dataset, bad):
    d = make_dataset(with_mask=False)
    inten = d["intensities"].copy()
    inten[5, 0, 2, 6] = bad
    _edit(d["path"], "intensities", inten)
    _raises(lambda: read_shard(d["path"], 0, 8), "data.h5:intensities", "image 5 (file row 5)",
            "expected finite values", "(panel 0, row 2, col 6)")
    # With clip=1, the pixel is still named in file coordinates.
    _raises(lambda: read_shard(d["path"], 3, 8, clip=1), "image 5 (file row 5)",
            "(panel 0, row 2, col 6)")


def test_float64_overflowing_float32_is_caught(make_dataset):
    d = make_dataset(with_mask=False, intensity_dtype="float64")
    inten = d["intensities"].copy()
    inten[2, 0, 0, 0] = 1e300
    _edit(d["path"], "intensities", inten)
    _raises(lambda: read_shard(d["path"], 0, 8), "image 2 (file row 2)", "expected finite")


def test_nonfinite_positions(make_dataset):
    d = make_dataset(layout="first")
    pos = np.moveaxis(d["positions"].copy(), -1, 0)
    pos[1, 0, 3, 4] = np.nan
    _edit(d["path"], "pixel_position_reciprocal", pos)
    _raises(lambda: read_geometry(d["path"]), "data.h5:pixel_position_reciprocal",
            "expected finite values", "(panel 0, row 3, col 4)")


def test_all_zero_positions(make_dataset):
    d = make_dataset()
    _edit(d["path"], "pixel_position_reciprocal", np.zeros((1, 8, 8, 3)))
    _raises(lambda: read_geometry(d["path"]), "data.h5:pixel_position_reciprocal",
            "found all zeros")


def test_zero_and_negative_positions_are_fine(make_dataset):
    d = make_dataset(with_mask=False)
    pos = d["positions"].copy()
    pos[0, 0, 0] = 0.0
    _edit(d["path"], "pixel_position_reciprocal", pos)
    g = read_geometry(d["path"])
    np.testing.assert_array_equal(g.positions[:, 0], 0.0)
    assert (g.positions < 0).any()


def test_negative_intensity_error_and_clip(make_dataset, caplog):
    d = make_dataset(with_mask=False)
    inten = d["intensities"].copy()
    inten[3, 0, 1, 1] = -2.0
    inten[4, 0, 7, 0] = -0.5
    _edit(d["path"], "intensities", inten)
    _raises(lambda: read_shard(d["path"], 0, 8), "data.h5:intensities",
            "image 3 (file row 3)", "expected photon counts >= 0", "found -2.0",
            "(panel 0, row 1, col 1)")
    with caplog.at_level(logging.WARNING, logger="spinifel"):
        s = read_shard(d["path"], 0, 8, negative="clip")
    expected = np.maximum(inten, 0).reshape(8, -1)
    np.testing.assert_array_equal(s.images, expected)
    assert any("clipped 2 negative" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="negative: expected 'error' or 'clip'"):
        read_shard(d["path"], 0, 8, negative="ignore")


def test_all_zero_image(make_dataset):
    d = make_dataset(with_mask=False)
    inten = d["intensities"].copy()
    inten[6] = 0
    _edit(d["path"], "intensities", inten)
    _raises(lambda: read_shard(d["path"], 0, 8), "data.h5:intensities",
            "image 6 (file row 6)", "found all 64 good pixels zero")


def test_image_zero_on_good_pixels_only(make_dataset):
    d = make_dataset(with_mask=True, rng=2)
    inten = d["intensities"].copy()
    inten[1][d["mask"]] = 0  # photons only on bad pixels
    _edit(d["path"], "intensities", inten)
    _raises(lambda: read_shard(d["path"], 0, 8), "image 1 (file row 1)", "good pixels zero")


def test_all_pixels_masked(make_dataset):
    d = make_dataset(H=4, W=4, with_mask=True)
    _edit(d["path"], "mask", np.zeros((1, 4, 4), np.uint8))
    _raises(lambda: read_geometry(d["path"]), "data.h5:mask", "all 16 pixels are masked")


def test_all_pixels_masked_only_after_binning(make_dataset):
    d = make_dataset(H=4, W=4, with_mask=True)
    m = np.ones((1, 4, 4), np.uint8)
    m[0, ::2, ::2] = 0  # one bad pixel in every 2x2 block
    _edit(d["path"], "mask", m)
    assert read_geometry(d["path"]).mask.sum() == 12
    _raises(lambda: read_geometry(d["path"], binning=1), "data.h5:mask",
            "all 4 pixels are masked after clip=0, binning=1")


def test_all_pixels_masked_after_clip(make_dataset):
    d = make_dataset(H=4, W=4, with_mask=True)
    m = np.ones((1, 4, 4), np.uint8)
    m[0, 1:3, 1:3] = 0  # the centre is bad, the border good
    _edit(d["path"], "mask", m)
    _raises(lambda: read_geometry(d["path"], clip=1), "all 4 pixels are masked after clip=1")


def test_clip_bin_not_divisible(make_dataset):
    d = make_dataset(H=10, W=8)
    _raises(lambda: read_geometry(d["path"], clip=1, binning=2), "data.h5:intensities",
            "panel 10x8 clipped by 1 is 8x6", "not divisible by 2**binning = 4")
    _raises(lambda: read_shard(d["path"], 0, 1, binning=3), "panel 10x8 clipped by 0 is 10x8")


def test_clip_too_large_and_negative(make_dataset):
    d = make_dataset(H=8, W=8)
    _raises(lambda: read_geometry(d["path"], clip=4), "clip=4 removes the whole 8x8 panel")
    with pytest.raises(ConfigError, match="clip: expected an integer >= 0, found -1"):
        read_geometry(d["path"], clip=-1)
    with pytest.raises(ConfigError, match="binning: expected an integer >= 0, found 1.5"):
        read_geometry(d["path"], binning=1.5)


def test_bad_row_range_and_geometry_mismatch(make_dataset):
    d = make_dataset()
    _raises(lambda: read_shard(d["path"], 3, 9), "expected rows 0 <= start <= stop <= 8",
            "found [3, 9)")
    g = read_geometry(d["path"], binning=1)
    _raises(lambda: read_shard(d["path"], 0, 2, geometry=g), "geometry shape (1, 4, 4)",
            "(1, 8, 8) after clip=0, binning=0")


# ----------------------------------------------------------------------------- info command


def _info_args(path, *extra):
    import argparse

    from spinifel.commands import info

    parser = argparse.ArgumentParser()
    info.add_args(parser)
    return info, parser.parse_args([str(path), *extra])


def test_info_json_matches_hand_computation(make_dataset, capsys):
    import json

    d = make_dataset(n_images=5, panels=2, H=6, W=6, with_ground_truth=True, rng=9)
    info, args = _info_args(d["path"], "--json", "--clip", "1", "--binning", "1")
    assert info.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 5 and out["detector_shape"] == [2, 6, 6]
    assert out["detector_shape_after"] == [2, 2, 2]
    assert out["n_masked"] == int((~d["mask"]).sum())
    _, ref_mask, _ = _reference_clip_bin(d, 1, 1)
    assert out["n_masked_after"] == int((~ref_mask).sum())
    assert out["datasets"]["intensities"] == {"shape": [5, 2, 6, 6], "dtype": "float32"}
    assert out["has_ground_truth"] and out["has_mask"] and out["has_orientations"]
    assert out["position_layout"] == "last"

    # Hand computation on the binned 2x2 panels: every pixel is a border midpoint and a
    # corner, so edge |s| = min over panels of the panel max, corner |s| = overall max.
    ref_pos, _, _ = _reference_clip_bin(d, 1, 1)
    s = np.linalg.norm(ref_pos, axis=0).reshape(2, 2, 2)
    edge = min(s[0].max(), s[1].max())
    corner = s.max()
    tol = 16 * F64_EPS
    assert out["reciprocal_extent_inv_m"] == pytest.approx(corner, rel=tol)
    assert out["edge_resolution_angstrom"] == pytest.approx(1e10 / edge, rel=tol)
    assert out["corner_resolution_angstrom"] == pytest.approx(1e10 / corner, rel=tol)
    assert out["edge_resolution_angstrom"] > out["corner_resolution_angstrom"]


def test_info_edge_uses_border_midpoints(make_dataset, capsys):
    import json

    d = make_dataset(panels=2, H=8, W=7, with_mask=False)
    info, args = _info_args(d["path"], "--json")
    info.main(args)
    out = json.loads(capsys.readouterr().out)
    s = np.linalg.norm(d["positions"], axis=-1)  # (2, 8, 7)
    # Rows 8 (even): middle rows 3 and 4; columns 7 (odd): middle column 3.
    mids = [(0, 3), (7, 3), (3, 0), (4, 0), (3, 6), (4, 6)]
    edge = min(max(s[p][r, c] for r, c in mids) for p in range(2))
    assert out["edge_resolution_angstrom"] == pytest.approx(1e10 / edge, rel=16 * F64_EPS)
    assert out["corner_resolution_angstrom"] == pytest.approx(1e10 / s.max(), rel=16 * F64_EPS)
    assert out["n_masked"] == 0 and not out["has_mask"] and not out["has_ground_truth"]


def test_info_text_and_errors(make_dataset, capsys, tmp_path):
    d = make_dataset(layout="first")
    info, args = _info_args(d["path"])
    assert info.main(args) == 0
    text = capsys.readouterr().out
    assert "images               8 (float32)" in text
    assert "position layout      first: (3, n_panels, H, W)" in text
    assert "detector used        (1, 8, 8): 64 pixels" in text
    assert "ground truth         absent" in text and "orientations         present" in text
    assert "pixel_position_reciprocal" in text and "resolution           edge " in text
    info, args = _info_args(tmp_path / "missing.h5")
    _raises(lambda: info.main(args), "missing.h5", "file not found")
    info, args = _info_args(d["path"], "--binning", "4")
    _raises(lambda: info.main(args), "not divisible by 2**binning = 16")
