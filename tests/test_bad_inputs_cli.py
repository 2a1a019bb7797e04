"""The bad-input catalogue through the command line: one line, exit code 2, nothing written."""

import h5py
import numpy as np
import pytest

from helpers import write_dataset
from spinifel.cli import main


def _mutate(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(name, value):
    def fn(f):
        del f[name]
        f[name] = value
    return fn


def _set_first(name, value):
    def fn(f):
        d = f[name][()]
        d.flat[0] = value
        del f[name]
        f[name] = d
    return fn


CASES = {
    "missing file": (None, "not found"),
    "not hdf5": ("junk", "HDF5"),
    "truncated": ("truncate", "cut.h5"),
    "no intensities": (lambda f: f.__delitem__("intensities"), "intensities"),
    "no positions": (lambda f: f.__delitem__("pixel_position_reciprocal"), "pixel_position_reciprocal"),
    "wrong rank": (_replace("intensities", np.ones((4, 8, 8), "f4")), "intensities"),
    "shape mismatch": (_replace("pixel_position_reciprocal", np.ones((1, 6, 8, 3))), "pixel_position_reciprocal"),
    "nan image": (_set_first("intensities", np.nan), "intensities"),
    "inf position": (_set_first("pixel_position_reciprocal", np.inf), "pixel_position_reciprocal"),
    "negative": (_set_first("intensities", -5.0), "negative"),
    "all-zero image": (_replace("intensities", np.zeros((8, 1, 8, 8), "f4")), "zero"),
    "all masked": (_replace("mask", np.zeros((1, 8, 8), "u1")), "mask"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset(case, tmp_path, capsys, rng):
    action, needle = CASES[case]
    path = tmp_path / "d.h5"
    write_dataset(path, n_images=8, rng=rng, mask_fraction=0.0)
    if action is None:
        path = tmp_path / "missing.h5"
    elif action == "junk":
        path.write_bytes(b"this is not HDF5")
    elif action == "truncate":
        data = path.read_bytes()
        path = tmp_path / "cut.h5"
        path.write_bytes(data[: len(data) // 3])
    else:
        _mutate(path, action)
    out = tmp_path / "out"
    code = main(["run", "--set", f"data.path={path}", "--out", str(out),
                 "--set", "algorithm.M=15", "--set", "algorithm.n_orientations=20"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(err) == 1, err
    assert path.name in err[0] and needle.lower() in err[0].lower(), err[0]
    assert not (out / "result.h5").exists()


@pytest.mark.parametrize("override,needle", [
    ("algorithm.n_orientations=1", "algorithm.n_orientations"),
    ("algorithm.M=8", "algorithm.M"),
    ("algorithm.generatons=3", "did you mean 'generations'"),
    ("output.dir=${SPINIFEL_SURELY_UNSET}/x", "SPINIFEL_SURELY_UNSET"),
])
def test_bad_config(override, needle, tmp_path, capsys, rng):
    path = tmp_path / "d.h5"
    write_dataset(path, rng=rng)
    code = main(["run", "--set", f"data.path={path}", "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_previous_result_is_refused(tmp_path, capsys, rng):
    path = tmp_path / "d.h5"
    write_dataset(path, rng=rng)
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.h5").write_bytes(b"previous")
    code = main(["run", "--set", f"data.path={path}", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "result.h5" in err[-1]
    assert (out / "result.h5").read_bytes() == b"previous"


def test_half_sets_with_too_few_images_refused(tmp_path, capsys, rng):
    """Catches the refusal of half sets on < 4 images raising NameError (ConfigError was
    used without being imported) or a traceback instead of one line and exit code 2."""
    path = tmp_path / "d.h5"
    write_dataset(path, n_images=3, rng=rng)
    out = tmp_path / "out"
    code = main(["run", "--set", f"data.path={path}", "--out", str(out),
                 "--set", "validation.half_sets=shared", "--set", "algorithm.M=15",
                 "--set", "algorithm.n_orientations=20"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1, err
    assert "validation.half_sets" in err[0] and "4 images" in err[0], err[0]
    assert not (out / "result.h5").exists()


def test_coarse_to_fine_on_gpu_refused(tmp_path, capsys, rng, monkeypatch):
    """Catches the coarse-to-fine + GPU refusal raising NameError (the bug) or running:
    through the CLI with the stand-in CuPy, one line and exit code 2."""
    import fake_cupy

    fake_cupy.install(monkeypatch)
    path = tmp_path / "d.h5"
    write_dataset(path, n_images=8, rng=rng)
    code = main(["run", "--set", f"data.path={path}", "--out", str(tmp_path / "out"),
                 "--set", "runtime.backend=cupy", "--set", "algorithm.search=coarse_to_fine",
                 "--set", "algorithm.M=15", "--set", "algorithm.n_orientations=20"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1, err
    assert "algorithm.search" in err[0] and "coarse_to_fine" in err[0], err[0]


def test_backend_check_directly():
    """Catches check_backend_config refusing the CPU path or accepting the GPU one."""
    from spinifel.config import load_config
    from spinifel.errors import ConfigError
    from spinifel.pipeline.problem import check_backend_config

    cfg = load_config(None, (), {"algorithm": {"search": "coarse_to_fine"}})
    check_backend_config(cfg, np)  # CPU: fine
    with pytest.raises(ConfigError, match="algorithm.search"):
        check_backend_config(cfg, object())  # any other array module
