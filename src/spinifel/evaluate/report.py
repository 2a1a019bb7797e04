"""Compare a reconstruction with ground truth: numbers, ``evaluation.json`` and plots.

:func:`evaluate_arrays` is pure and in memory (the pipeline calls it on rank 0 each
generation); :func:`evaluate_result` reads ``OUT/result.h5`` and a truth source, writes
``OUT/evaluation.json`` and the PNGs. Nothing here imports mpi4py.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from spinifel.errors import DatasetError, OutputError
from spinifel.evaluate.align import align_density, rotate_volume, search_rotation
from spinifel.evaluate.fsc import (
    fsc,
    intensity_shell_correlation,
    pearson,
    resolution_fields,
    to_host,
)
from spinifel.evaluate.orientations import (
    as_quaternions,
    error_summary,
    global_rotation,
    orientation_errors,
)
from spinifel.geometry import orientations as quat

# Truth mask for the "inside the molecule" correlation: voxels above this fraction of the
# truth density's maximum, grown by one voxel so the molecule's edge counts.
MASK_FRACTION = 0.02
# Relative tolerance on the voxel sizes of the result and the truth.
VOXEL_RTOL = 1e-3
# Intensities below this fraction of their maximum are clipped before taking logs.
LOG_FLOOR = 1e-8


@dataclass(frozen=True)
class GroundTruth:
    """A known structure to compare against.

    Attributes
    ----------
    density : ndarray, shape (M, M, M), float32
        Electron density on the centred grid.
    intensity : ndarray, shape (M, M, M), float32
        Its 3D intensity on the centred reciprocal grid (``|F(density)|^2``).
    orientations : ndarray, shape (N, 4), float64, or None
        True quaternions ``[w, x, y, z]`` of the dataset's images, in file order.
    voxel_size_angstrom : float
        Real-space voxel size ``d``.
    name : str
        Structure name for titles and the report.
    """

    density: np.ndarray
    intensity: np.ndarray
    orientations: np.ndarray | None
    voxel_size_angstrom: float
    name: str


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_orientations(f: Any, path: Path) -> np.ndarray | None:
    if "orientations" not in f:
        return None
    q = np.asarray(f["orientations"][()], dtype=np.float64)
    try:
        return as_quaternions(q)
    except ValueError:
        raise DatasetError(path, "orientations",
                           f"expected shape (N, 4) or (N, 1, 4), found {q.shape}") from None


def _open_h5(path: Path, error: type) -> Any:
    import h5py

    if not path.is_file():
        if error is DatasetError:
            raise DatasetError(path, None, "file not found")
        raise OutputError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if error is DatasetError:
            raise DatasetError(path, None, f"not a readable HDF5 file ({exc})") from None
        raise OutputError(f"{path}: not a readable HDF5 file ({exc})") from None


def load_ground_truth(dataset_path: str | os.PathLike, M: int | None = None,
                      reciprocal_extent_inv_m: float | None = None) -> GroundTruth | None:
    """Read the ``ground_truth/`` group (and top-level ``orientations``) of a dataset.

    Parameters
    ----------
    dataset_path : path
        HDF5 dataset written by ``spinifel-mpi simulate`` (or any file with that layout).
    M, reciprocal_extent_inv_m : int and float, optional
        The reconstruction's grid. When the stored truth is on another grid (a run with a
        different ``M``, or clipped/binned data) and the file stores the atoms
        (``ground_truth/atoms_xyz``, ``atoms_element``), the truth is rendered again on
        this grid; without atoms a mismatch is left for the caller to report.

    Returns
    -------
    GroundTruth or None
        ``None`` when the file has no ``ground_truth`` group (e.g. a skopi file).

    Raises
    ------
    DatasetError
        Missing file, unreadable HDF5, missing ``density``/``intensity``/voxel size, or
        shapes that are not one cubic grid.
    """
    path = Path(dataset_path)
    with _open_h5(path, DatasetError) as f:
        if "ground_truth" not in f:
            return None
        g = f["ground_truth"]
        vols = {}
        for key in ("density", "intensity"):
            if key not in g:
                raise DatasetError(path, f"ground_truth/{key}", "dataset missing")
            vols[key] = np.asarray(g[key][()], dtype=np.float32)
            shape = vols[key].shape
            if len(shape) != 3 or len(set(shape)) != 1:
                raise DatasetError(path, f"ground_truth/{key}",
                                   f"expected a cubic (M, M, M) grid, found shape {shape}")
        if vols["density"].shape != vols["intensity"].shape:
            raise DatasetError(path, "ground_truth/intensity",
                               f"shape {vols['intensity'].shape} differs from density "
                               f"{vols['density'].shape}")
        if "voxel_size_angstrom" in g.attrs:
            d = float(g.attrs["voxel_size_angstrom"])
        elif "voxel_size_angstrom" in f.attrs:
            d = float(f.attrs["voxel_size_angstrom"])
        else:
            raise DatasetError(path, "ground_truth", "attribute voxel_size_angstrom missing")
        if not d > 0:
            raise DatasetError(path, "ground_truth", f"voxel_size_angstrom must be > 0, found {d}")
        name = _attr_str(g.attrs.get("structure_name", path.stem))
        q = _read_orientations(f, path)
        if M is not None and reciprocal_extent_inv_m is not None and "atoms_xyz" in g:
            d_run = 1e10 / (2.0 * reciprocal_extent_inv_m)
            if vols["density"].shape[0] != M or abs(d_run - d) > 1e-6 * d:
                from spinifel.simulate.structure import Structure
                from spinifel.simulate.truth import render_ground_truth

                elements = np.array([e.decode() if isinstance(e, bytes) else str(e)
                                     for e in g["atoms_element"][()]])
                st = Structure(name=name, xyz=np.asarray(g["atoms_xyz"][()], dtype=np.float64),
                               elements=elements)
                vols["density"], vols["intensity"] = render_ground_truth(st, M, reciprocal_extent_inv_m)
                d = d_run
    return GroundTruth(density=vols["density"], intensity=vols["intensity"], orientations=q,
                       voxel_size_angstrom=d, name=name)


def _render_from_pdb(pdb: str | os.PathLike, m: int, reciprocal_extent_inv_m: float,
                     voxel_size_angstrom: float) -> GroundTruth:
    """Render a truth from a structure file with the simulate package (imported lazily)."""
    from spinifel.simulate.structure import load_structure
    from spinifel.simulate.truth import render_ground_truth

    path = Path(pdb)
    if not path.is_file():
        raise DatasetError(path, None, "structure file not found")
    density, intensity = render_ground_truth(load_structure(path), m, reciprocal_extent_inv_m)
    return GroundTruth(density=np.asarray(density, dtype=np.float32),
                       intensity=np.asarray(intensity, dtype=np.float32), orientations=None,
                       voxel_size_angstrom=voxel_size_angstrom, name=path.stem)


def _ball(m: int) -> np.ndarray:
    k = np.arange(m) - (m - 1) / 2.0
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return r2 <= ((m - 1) / 2.0) ** 2


def _log_clip(v: np.ndarray) -> np.ndarray:
    vmax = float(np.max(v))
    return np.log(np.maximum(v, vmax * LOG_FLOOR if vmax > 0 else 1e-300))


def _evaluate(density: object, intensity: object, orientations: object | None,
              voxel_size_angstrom: float, truth: GroundTruth,
              grid_spacing_deg: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation; returns (JSON-ready summary, arrays for the plots)."""
    t0 = time.perf_counter()
    rho = to_host(density).astype(np.float64)
    inten = to_host(intensity).astype(np.float64)
    t_rho = np.asarray(truth.density, dtype=np.float64)
    t_int = np.asarray(truth.intensity, dtype=np.float64)
    for name, a in (("density", rho), ("intensity", inten)):
        if a.shape != t_rho.shape:
            raise ValueError(f"{name} shape {a.shape} does not match the truth grid {t_rho.shape}")
    d = float(voxel_size_angstrom)
    if not math.isclose(d, truth.voxel_size_angstrom, rel_tol=VOXEL_RTOL):
        raise ValueError(f"voxel size {d} A does not match the truth's "
                         f"{truth.voxel_size_angstrom} A")
    m = rho.shape[0]
    out: dict[str, Any] = {"M": m, "voxel_size_angstrom": d, "truth_name": truth.name}
    arrays: dict[str, Any] = {"orientation_errors_deg": None}

    # 1. Global rotation: from orientations when both sides have them, else by search.
    if orientations is not None and truth.orientations is not None:
        q_rec = as_quaternions(orientations, "orientations")
        q_true = as_quaternions(truth.orientations, "truth orientations")
        if q_rec.shape[0] > q_true.shape[0]:
            raise ValueError(f"result has {q_rec.shape[0]} orientations but the truth only "
                             f"{q_true.shape[0]}")
        # A run on the first n images of a dataset compares with the first n truths.
        q_true = q_true[: q_rec.shape[0]]
        g, ginfo = global_rotation(q_true, q_rec)
        errs = orientation_errors(q_true, q_rec, g, ginfo["convention"])
        arrays["orientation_errors_deg"] = errs
        out["global_rotation_source"] = "orientations"
        out["orientation_convention"] = ginfo["convention"]
        out["global_rotation_info"] = ginfo
        out["orientation_error_deg"] = error_summary(errs, grid_spacing_deg)
    else:
        g, ginfo = search_rotation(inten, t_int)
        out["global_rotation_source"] = "intensity_search"
        out["orientation_convention"] = None
        out["global_rotation_info"] = ginfo
        out["orientation_error_deg"] = None
    out["global_rotation_quaternion"] = [float(x) for x in quat.matrix_to_quaternion(g)]

    # 2. Intensity in the truth frame: no hand or shift ambiguity.
    i_al = rotate_volume(inten, g, order=3)
    ball = _ball(m)
    out["intensity_correlation"] = pearson(i_al, t_int, ball)
    out["intensity_log_correlation"] = pearson(_log_clip(i_al), _log_clip(t_int), ball)
    sf, sc = intensity_shell_correlation(i_al, t_int, d)
    out["intensity_shell_correlation"] = {"freq": sf.tolist(), "correlation": sc.tolist()}

    # 3. Density: rotate, then hand, shift and scale.
    rho_al, ainfo = align_density(rotate_volume(rho, g, order=3), t_rho)
    tmax = float(np.max(t_rho))
    mask = ndimage.binary_dilation(t_rho > MASK_FRACTION * tmax) if tmax > 0 else None
    out["density_correlation"] = ainfo["correlation"]
    out["density_correlation_in_mask"] = (pearson(rho_al, t_rho, mask)
                                          if mask is not None else float("nan"))
    out["density_hand"] = ainfo["hand"]
    out["density_shift_voxels"] = ainfo["shift"]
    out["density_scale"] = ainfo["scale"]
    freq, curve = fsc(rho_al, t_rho, d)
    out["fsc_curve"] = {"freq": freq.tolist(), "fsc": curve.tolist()}
    out.update(resolution_fields("fsc_resolution_0p5", freq, curve, 0.5, 2 * d))
    out.update(resolution_fields("fsc_resolution_0p143", freq, curve, 0.143, 2 * d))
    out["nyquist_resolution_angstrom"] = 2 * d
    out["evaluation_seconds"] = time.perf_counter() - t0

    # Scale the intensity least-squares onto the truth for display.
    den = float(np.sum(i_al * i_al))
    arrays.update(density=rho_al, truth_density=t_rho,
                  intensity=i_al * (float(np.sum(i_al * t_int)) / den if den > 0 else 1.0),
                  truth_intensity=t_int)
    return jsonable(out), arrays


def jsonable(x: Any) -> Any:
    """Convert to JSON types: numpy scalars/arrays to Python, nan and inf to ``None``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def evaluate_arrays(*, density: object, intensity: object, orientations: object | None,
                    voxel_size_angstrom: float, truth: GroundTruth,
                    grid_spacing_deg: float | None = None) -> dict[str, Any]:
    """Evaluate a reconstruction held in memory against ground truth (pure, host-side).

    Parameters
    ----------
    density, intensity : array, shape (M, M, M)
        Reconstructed density and 3D intensity on the truth's grid (numpy or CuPy).
    orientations : array, shape (N, 4), or None
        Reconstructed quaternions in the dataset's image order (the first ``N`` truth
        orientations are compared). ``None``, or a truth without orientations, makes the
        global rotation come from an intensity rotation search instead (slower, seconds).
    voxel_size_angstrom : float
        Real-space voxel size of the reconstruction; must match the truth's within 0.1 %.
    truth : GroundTruth
    grid_spacing_deg : float, optional
        Orientation grid spacing for ``frac_within_grid_spacing``.

    Returns
    -------
    dict
        JSON-serialisable (non-finite numbers become ``None``): ``density_correlation``,
        ``density_correlation_in_mask``, ``density_hand``, ``density_shift_voxels``,
        ``fsc_curve`` {``freq`` (1/angstrom), ``fsc``}, ``fsc_resolution_0p5_angstrom``,
        ``fsc_resolution_0p143_angstrom`` (None when the FSC never drops below the
        threshold; ``..._reached`` false, ``..._status`` and ``..._better_than_angstrom``
        (Nyquist) say so: :func:`~spinifel.evaluate.fsc.resolution_fields`),
        ``intensity_correlation``,
        ``intensity_log_correlation``, ``intensity_shell_correlation``,
        ``orientation_error_deg`` {median, p90, mean, frac_within_grid_spacing, ...} or
        ``None``, ``global_rotation_quaternion`` ([w, x, y, z] of ``G`` with
        ``I_rec(s) = I_true(G s)``), ``global_rotation_source``, ``orientation_convention``.

    Raises
    ------
    ValueError
        Grid shape or voxel size differ from the truth, or more orientations than truths.
    """
    summary, _ = _evaluate(density, intensity, orientations, voxel_size_angstrom, truth,
                           grid_spacing_deg)
    return summary


def _grid_spacing_from_config(config_text: str | None) -> float | None:
    """``grid_spacing(algorithm.n_orientations)`` in degrees from a TOML config, or None."""
    if not config_text:
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        n = tomllib.loads(config_text).get("algorithm", {}).get("n_orientations")
    except (tomllib.TOMLDecodeError, AttributeError):
        return None
    if not isinstance(n, int) or n < 1:
        return None
    return math.degrees(quat.grid_spacing(n))


def _read_result(path: Path) -> dict[str, Any]:
    with _open_h5(path, OutputError) as f:
        res: dict[str, Any] = {}
        for key in ("density", "intensity"):
            if key not in f:
                raise OutputError(f"{path}:{key}: dataset missing from the result file")
            res[key] = np.asarray(f[key][()], dtype=np.float32)
            if res[key].ndim != 3 or len(set(res[key].shape)) != 1:
                raise OutputError(f"{path}:{key}: expected a cubic (M, M, M) grid, found "
                                  f"shape {res[key].shape}")
        res["orientations"] = (np.asarray(f["orientations"][()], dtype=np.float64)
                               if "orientations" in f else None)
        if "voxel_size_angstrom" not in f.attrs:
            raise OutputError(f"{path}: attribute voxel_size_angstrom missing")
        res["voxel_size_angstrom"] = float(f.attrs["voxel_size_angstrom"])
        ext = f.attrs.get("reciprocal_extent_inv_angstrom")
        res["reciprocal_extent_inv_angstrom"] = None if ext is None else float(ext)
        cfg = f.attrs.get("config")
        res["config"] = None if cfg is None else _attr_str(cfg)
        gen = f.attrs.get("generation")
        res["generation"] = None if gen is None else int(gen)
    return res


def _read_metrics(out_dir: Path) -> dict[str, Any] | None:
    p = out_dir / "metrics.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None  # a half-written or foreign file only costs the convergence plot


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary name in the same directory and
    ``os.replace``, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc})") from None


def evaluate_result(out_dir: str | os.PathLike, truth_path: str | os.PathLike | None = None,
                    pdb: str | os.PathLike | None = None, plots: bool = True) -> dict[str, Any]:
    """Evaluate ``OUT/result.h5`` against a truth; write ``OUT/evaluation.json`` and PNGs.

    Parameters
    ----------
    out_dir : path
        Result directory of ``spinifel-mpi run``.
    truth_path : path, optional
        Dataset with a ``ground_truth/`` group (density, intensity, voxel size) and
        ``orientations``. With ``pdb`` as well, only its ``orientations`` are used (e.g.
        a skopi file without a ground_truth group).
    pdb : path, optional
        Structure file rendered on the result's grid by ``spinifel.simulate``.
    plots : bool
        Write ``fsc.png``, ``sections_density.png``, ``sections_intensity.png``,
        ``orientation_errors.png`` (when orientations are compared) and
        ``convergence.png`` (when ``metrics.json`` has per-generation numbers).

    Returns
    -------
    dict
        The :func:`evaluate_arrays` summary plus ``result_path``, ``truth_source``,
        ``generation`` and ``plots`` (file names written).

    Raises
    ------
    OutputError
        Missing or unreadable ``result.h5``, missing datasets, unwritable directory.
    DatasetError
        No truth given, truth file without ground truth (and no ``pdb``), shape or voxel
        size mismatch, more result orientations than truth orientations.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise OutputError(f"{out}: result directory not found")
    result_path = out / "result.h5"
    res = _read_result(result_path)
    m = res["density"].shape[0]
    d = res["voxel_size_angstrom"]
    if truth_path is None and pdb is None:
        raise DatasetError(out, None, "no ground truth given: pass --truth DATASET.h5 "
                           "(with a ground_truth group) or --pdb FILE")
    if pdb is not None:
        ext = res["reciprocal_extent_inv_angstrom"]
        if ext is None or not ext > 0:
            raise OutputError(f"{result_path}: attribute reciprocal_extent_inv_angstrom "
                              f"missing or not positive, needed to render --pdb")
        truth = _render_from_pdb(pdb, m, ext * 1e10, d)
        source = f"pdb:{pdb}"
        if truth_path is not None:
            with _open_h5(Path(truth_path), DatasetError) as f:
                q = _read_orientations(f, Path(truth_path))
            truth = GroundTruth(truth.density, truth.intensity, q, d, truth.name)
            source += f" orientations:{truth_path}"
    else:
        truth = load_ground_truth(truth_path)
        if truth is None:
            raise DatasetError(truth_path, "ground_truth",
                               "group missing (not a `spinifel-mpi simulate` dataset); "
                               "pass --pdb FILE to render the truth")
        source = f"dataset:{truth_path}"
        if truth.density.shape != res["density"].shape:
            raise DatasetError(truth_path, "ground_truth/density",
                               f"grid shape {truth.density.shape} does not match the result's "
                               f"{res['density'].shape}")
        if not math.isclose(truth.voxel_size_angstrom, d, rel_tol=VOXEL_RTOL):
            raise DatasetError(truth_path, "ground_truth",
                               f"voxel_size_angstrom {truth.voxel_size_angstrom:.6g} does not "
                               f"match the result's {d:.6g}")
    q_rec = res["orientations"]
    if q_rec is not None and truth.orientations is not None:
        n_rec, n_true = as_quaternions(q_rec).shape[0], truth.orientations.shape[0]
        if n_rec > n_true:
            raise DatasetError(truth_path, "orientations",
                               f"{n_true} truth orientations but the result has {n_rec}")
    spacing = _grid_spacing_from_config(res["config"])
    summary, arrays = _evaluate(res["density"], res["intensity"], q_rec, d, truth, spacing)
    summary.update(result_path=str(result_path), truth_source=source,
                   generation=res["generation"])
    written: list[str] = []
    if plots:
        from spinifel.evaluate.plots import make_plots

        written = make_plots(out, summary, arrays, _read_metrics(out))
    summary["plots"] = written
    write_json_atomic(out / "evaluation.json", summary)
    return summary
