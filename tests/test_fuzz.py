"""Property-based tests: malformed configs and HDF5 files give our own errors, never a traceback."""

import string

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinifel.config import default_dict, dumps_toml, load_config
from spinifel.errors import SpinifelError
from spinifel.io.dataset import inspect_dataset, read_geometry, read_shard

DEFAULTS = default_dict()
KEYS = [(s, k) for s, sec in DEFAULTS.items() for k in sec]
scalars = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.text(string.printable, max_size=12))
values = st.one_of(scalars, st.lists(scalars, max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.sampled_from(KEYS + [("algorithm", "bogus"), ("nosuch", "M")]),
                                  values), min_size=1, max_size=5))
def test_malformed_config_values(tmp_path, entries):
    doc: dict = {}
    for (sec, key), v in entries:
        doc.setdefault(sec, {})[key] = v
    p = tmp_path / "c.toml"
    try:
        p.write_text(dumps_toml(doc))
    except TypeError:
        return
    try:
        load_config(p)
    except SpinifelError as e:
        assert "\n" not in str(e)


shapes = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 5), st.integers(0, 5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(img_shape=shapes, pos_layout=st.sampled_from(["last", "first", "bad", "missing"]),
       fill=st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf]), dtype=st.sampled_from(["f4", "f8", "i4", "u1"]),
       mask=st.sampled_from([None, "zeros", "ones", "badshape"]), drop_intensities=st.booleans())
def test_malformed_hdf5(tmp_path, img_shape, pos_layout, fill, dtype, mask, drop_intensities):
    n, panels, h, w = img_shape
    path = tmp_path / "d.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        if not drop_intensities:
            data = rng.uniform(0, 5, (n, panels, h, w))
            if data.size:
                data.flat[0] = fill
            if np.dtype(dtype).kind in "iu":
                data = np.nan_to_num(np.abs(data), posinf=1.0)
            f["intensities"] = data.astype(dtype)
        pos = rng.uniform(-1e9, 1e9, (panels, h, w, 3))
        if pos_layout == "last":
            f["pixel_position_reciprocal"] = pos
        elif pos_layout == "first":
            f["pixel_position_reciprocal"] = np.moveaxis(pos, -1, 0)
        elif pos_layout == "bad":
            f["pixel_position_reciprocal"] = pos[..., :2]
        if mask == "zeros":
            f["mask"] = np.zeros((panels, h, w), "u1")
        elif mask == "ones":
            f["mask"] = np.ones((panels, h, w), "u1")
        elif mask == "badshape":
            f["mask"] = np.ones((panels + 1, h, w), "u1")
    try:
        info = inspect_dataset(path)
        geom = read_geometry(path)
        read_shard(path, 0, info.n_images, geometry=geom)
    except SpinifelError as e:
        assert "\n" not in str(e) and str(path) in str(e)


def test_not_hdf5_and_truncated(tmp_path, rng):
    from helpers import write_dataset

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(SpinifelError, match="junk.h5"):
        inspect_dataset(junk)
    full = tmp_path / "full.h5"
    write_dataset(full, n_images=50, H=16, W=16, rng=rng)
    data = full.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpinifelError, match="cut.h5"):
        info = inspect_dataset(cut)
        read_shard(cut, 0, info.n_images)
