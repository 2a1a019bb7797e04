"""The results writer (called on rank 0 only): ``result.h5``, MRC maps and ``metrics.json``.

Every file is written atomically (:func:`atomic_write`): to a temporary name in the same
directory, flushed to disk, then renamed onto the final name. A crash or an exception
never leaves a half-written ``result.h5``; an earlier result stays intact until the new
one is complete.

``result.h5`` layout
--------------------
=================== ============== ========= ==================================================
dataset             shape          dtype     meaning
=================== ============== ========= ==================================================
``density``         (M, M, M)      float32   electron density, ``vol[ix, iy, iz]``, centre voxel
                                             ``(M-1)/2`` at the origin, voxel size below
``intensity``       (M, M, M)      float32   3D intensity on the reciprocal grid (spacing
                                             ``2 * reciprocal_extent / M``)
``autocorrelation`` (M, M, M)      float32   the merged autocorrelation
``support``         (M, M, M)      uint8     1 = inside the support
``orientations``    (N, 4)         float64   fitted quaternions ``[w, x, y, z]``, file row order
=================== ============== ========= ==================================================

Attributes: ``voxel_size_angstrom``, ``reciprocal_extent_inv_angstrom``, ``generation``,
``n_ranks``, ``spinifel_version``, ``config`` (the TOML text of the run), plus any
``extra_attrs``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spinifel.errors import DatasetError, OutputError
from spinifel.io.mrc import read_mrc, write_mrc

__all__ = [
    "RESULT_NAME",
    "METRICS_NAME",
    "atomic_write",
    "prepare_output_dir",
    "write_result",
    "read_result",
    "write_metrics",
    "write_mrc",
    "read_mrc",
]

RESULT_NAME = "result.h5"
METRICS_NAME = "metrics.json"
DENSITY_MRC = "density.mrc"
INTENSITY_MRC = "intensity.mrc"

_VOLUMES = ("density", "intensity", "autocorrelation")
_RESERVED = set(_VOLUMES) | {
    "support", "orientations", "voxel_size_angstrom", "reciprocal_extent_inv_angstrom",
    "generation", "n_ranks", "spinifel_version", "config",
}


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not every platform/filesystem allows it (ignored then)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write_fn(tmp)`` writes a temporary file beside it.

    The temporary file is ``.<name>.tmp-<pid>`` in the same directory (so the final
    ``os.replace`` is a rename within one filesystem); it is fsynced before the rename.

    Parameters
    ----------
    path : str or path-like
        Final file name; its directory must exist.
    write_fn : callable
        Called once with the temporary path; must create and close that file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputError
        An OS error while writing, syncing or renaming (the message names ``path``).
    Exception
        Whatever ``write_fn`` raises (other than ``OSError``), unchanged. In every failure
        the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        write_fn(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"{final}: cannot write: {exc}") from exc
        raise
    _fsync_dir(final.parent)
    return final


def prepare_output_dir(
    path: str | os.PathLike, overwrite: bool = False, resume: bool = False
) -> Path:
    """Create (with parents) and check the output directory before any work is done.

    Parameters
    ----------
    path : str or path-like
        The output directory.
    overwrite : bool
        Allow a directory that already holds ``result.h5`` (it is replaced at the end).
    resume : bool
        Allow it too (a resumed run continues in its own directory).

    Returns
    -------
    Path
        The directory.

    Raises
    ------
    OutputError
        ``path`` exists and is not a directory, cannot be created, is not writable
        (checked by creating and removing a probe file), or holds ``result.h5`` while
        neither ``overwrite`` nor ``resume`` is set.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: output path exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output directory: {exc.strerror or exc}") from exc
    probe = out / f".spinifel-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
    except OSError as exc:
        raise OutputError(
            f"{out}: output directory is not writable: {exc.strerror or exc}"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if (out / RESULT_NAME).exists() and not (overwrite or resume):
        raise OutputError(
            f"{out}: already holds {RESULT_NAME}; choose another directory, or pass "
            f"overwrite (replace it) or resume"
        )
    return out


def _volume(name: str, a: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    v = np.asarray(a)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(
            f"write_result: {name} must be a cubic (M, M, M) array, found shape {v.shape}"
        )
    if shape is not None and v.shape != shape:
        raise ValueError(f"write_result: {name} has shape {v.shape}, expected {shape} like density")
    if np.iscomplexobj(v):
        raise ValueError(f"write_result: {name} must be real, found dtype {v.dtype}")
    return v


def _attr(name: str, value: Any) -> Any:
    """A value h5py can store as an attribute (dicts and None become JSON text)."""
    if isinstance(value, (Mapping, list, tuple)) or value is None:
        return json.dumps(_jsonable(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, bytes, bool, int, float, np.generic, np.ndarray)):
        return value
    raise ValueError(
        f"write_result: attribute {name!r} has unsupported type {type(value).__name__}"
    )


def write_result(
    out_dir: str | os.PathLike,
    *,
    density: np.ndarray,
    intensity: np.ndarray,
    autocorrelation: np.ndarray,
    support: np.ndarray,
    orientations: np.ndarray,
    voxel_size_angstrom: float,
    reciprocal_extent_inv_angstrom: float,
    generation: int,
    n_ranks: int,
    config_toml: str,
    extra_attrs: dict | None = None,
    write_mrc: bool = True,
) -> Path:
    """Write ``OUT/result.h5`` (and ``density.mrc``, ``intensity.mrc``), each atomically.

    Parameters
    ----------
    out_dir : str or path-like
        Existing output directory (see :func:`prepare_output_dir`).
    density, intensity, autocorrelation : ndarray, shape (M, M, M), real
        Stored as float32. Host arrays (call ``.get()`` on CuPy arrays first).
    support : ndarray, shape (M, M, M), bool or int
        Stored as uint8 (nonzero -> 1).
    orientations : ndarray, shape (N, 4)
        Quaternions ``[w, x, y, z]`` in file row order; stored as float64.
    voxel_size_angstrom : float
        Real-space voxel size ``d`` in angstrom (> 0).
    reciprocal_extent_inv_angstrom : float
        ``max |s|`` in inverse angstrom (> 0); ``intensity.mrc`` gets the reciprocal voxel
        spacing ``2 * extent / M`` (inverse angstrom) as its "voxel size".
    generation : int
        Last completed generation.
    n_ranks : int
        MPI ranks of the run.
    config_toml : str
        The run's full configuration as TOML text.
    extra_attrs : dict, optional
        More root attributes (str, numbers, arrays; dicts/lists/None stored as JSON text).
        Their names must not clash with the datasets and attributes above.
    write_mrc : bool, default True
        Also write the two MRC maps.

    Returns
    -------
    Path
        The ``result.h5`` path.

    Raises
    ------
    ValueError
        Inconsistent shapes, non-positive sizes, clashing ``extra_attrs`` names.
    OutputError
        An OS error while writing.
    """
    from spinifel import __version__

    out = Path(out_dir)
    dens = _volume("density", density, None)
    inten = _volume("intensity", intensity, dens.shape)
    ac = _volume("autocorrelation", autocorrelation, dens.shape)
    sup = _volume("support", support, dens.shape)
    q = np.asarray(orientations, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4:
        raise ValueError(f"write_result: orientations must have shape (N, 4), found {q.shape}")
    for name, v in (("voxel_size_angstrom", voxel_size_angstrom),
                    ("reciprocal_extent_inv_angstrom", reciprocal_extent_inv_angstrom)):
        if not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"write_result: {name} must be finite and > 0, found {v}")
    extra = dict(extra_attrs or {})
    clash = sorted(_RESERVED & set(extra))
    if clash:
        raise ValueError(f"write_result: extra_attrs may not redefine {clash}")

    attrs: dict[str, Any] = {
        "voxel_size_angstrom": float(voxel_size_angstrom),
        "reciprocal_extent_inv_angstrom": float(reciprocal_extent_inv_angstrom),
        "generation": int(generation),
        "n_ranks": int(n_ranks),
        "spinifel_version": __version__,
        "config": str(config_toml),
    }
    attrs.update({k: _attr(k, v) for k, v in extra.items()})

    def _write_h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("density", data=dens.astype(np.float32))
            f.create_dataset("intensity", data=inten.astype(np.float32))
            f.create_dataset("autocorrelation", data=ac.astype(np.float32))
            f.create_dataset("support", data=(sup != 0).astype(np.uint8))
            f.create_dataset("orientations", data=q)
            for k, v in attrs.items():
                f.attrs[k] = v

    if write_mrc:
        m = dens.shape[0]
        atomic_write(out / DENSITY_MRC, lambda t: _write_mrc(t, dens, voxel_size_angstrom))
        spacing = 2.0 * float(reciprocal_extent_inv_angstrom) / m
        atomic_write(out / INTENSITY_MRC, lambda t: _write_mrc(t, inten, spacing))
    # result.h5 last: its presence means the whole result is complete.
    return atomic_write(out / RESULT_NAME, _write_h5)


_write_mrc = write_mrc  # the keyword argument of write_result shadows the function name


def _attr_out(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_result(path_or_dir: str | os.PathLike) -> dict:
    """Read ``result.h5`` back.

    Parameters
    ----------
    path_or_dir : str or path-like
        The file, or the output directory holding ``result.h5``.

    Returns
    -------
    dict
        Datasets ``density``, ``intensity``, ``autocorrelation`` (M, M, M) float32,
        ``support`` (M, M, M) uint8, ``orientations`` (N, 4) float64, and every root
        attribute as a plain Python value (``voxel_size_angstrom``, ``config``, ...).

    Raises
    ------
    DatasetError
        Missing, unreadable or incomplete file.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / RESULT_NAME
    if not p.is_file():
        raise DatasetError(p, None, "result file not found")
    out: dict[str, Any] = {}
    try:
        with h5py.File(p, "r") as f:
            for name in (*_VOLUMES, "support", "orientations"):
                if name not in f:
                    raise DatasetError(p, name, "required dataset is missing")
                out[name] = f[name][()]
            for k, v in f.attrs.items():
                out[k] = _attr_out(v)
    except OSError as exc:
        detail = " ".join(str(exc).split())
        raise DatasetError(p, None, f"not a readable HDF5 file: {detail}") from exc
    return out


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; numpy scalars/arrays converted, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, complex):
        return {"real": _jsonable(obj.real), "imag": _jsonable(obj.imag)}
    if isinstance(obj, Path):
        return str(obj)
    raise ValueError(f"metrics: cannot convert {type(obj).__name__} to JSON")


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write ``OUT/metrics.json`` atomically.

    numpy scalars and arrays become numbers and (nested) lists; NaN and infinities become
    ``null`` so that the file is strict JSON; complex numbers become
    ``{"real": .., "imag": ..}``.

    Returns
    -------
    Path
        The ``metrics.json`` path.
    """
    text = json.dumps(_jsonable(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(Path(out_dir) / METRICS_NAME, lambda t: t.write_text(text))
