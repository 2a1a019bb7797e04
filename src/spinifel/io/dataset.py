"""Reader of the original SpiniFEL/skopi HDF5 dataset layout, one shard of images per rank.

The file is read unchanged (see ``docs/reference-notes`` of the project for the layout):

=============================== ===================================== ====================
dataset                         shape                                 notes
=============================== ===================================== ====================
``intensities``                 (N, n_panels, H, W), any int/float    photons / pixel
``pixel_position_reciprocal``   (n_panels, H, W, 3) ("last", skopi)   inverse metres,
                                or (3, n_panels, H, W) ("first")      |s| = 2 sin(th)/lambda
``pixel_index_map`` (optional)  (n_panels, H, W, 2), int              display only
``orientations`` (optional)     (N, 4) or (N, 1, 4), [w, x, y, z]     ground truth
``mask`` (optional)             (n_panels, H, W), int or bool         nonzero = good
``ground_truth`` (optional)     group                                 presence reported
=============================== ===================================== ====================

Three levels of cost:

* :func:`inspect_dataset` reads metadata only (shapes, dtypes, attributes) and validates
  the structure; every rank may call it.
* :func:`read_geometry` reads the detector (positions and mask, a few MB) and applies the
  clipping and binning.
* :func:`read_shard` reads only the rows ``[start, stop)`` of ``intensities`` (and of
  ``orientations``) and validates their values. Each rank validates its own rows, so
  the cost of checking the images is shared like the images themselves.

Pixel arrays returned by this module are flattened in ``(panel, row, col)`` C order after
clipping and binning; positions, mask and image columns share that order.

Every public function takes ``format``: ``"skopi"`` (this layout), ``"cxi"`` (CXIDB 1.6
files, read by :mod:`spinifel.io.cxi`: images, mask bits and a detector geometry from which
the reciprocal positions are computed) or ``"auto"`` (the default: CXI when the file has a
``cxi_version`` or an ``entry_1`` group, else skopi). Both formats give the same objects, and
clipping, binning and the validation of images are shared.

No function here imports MPI; the caller passes ``rank`` / ``n_ranks`` to
:func:`shard_bounds`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from spinifel.errors import ConfigError, DatasetError
from spinifel.io import cxi
from spinifel.io.common import (
    GROUND_TRUTH,
    INDEX_MAP,
    INTENSITIES,
    MASK,
    ORIENTATIONS,
    POSITIONS,
    DatasetInfo,
    DetectorGeometry,
    ImageShard,
    _attr_value,
    _dtype_name,
    _open,
)
from spinifel.parallel.partition import block_range

log = logging.getLogger("spinifel")

FORMATS = ("auto", "skopi", "cxi")

# Rows converted to float32 at a time in read_shard: bounds the temporaries (a 128x128
# detector gives 16 MB per 256 rows) whatever the shard size.
_CHUNK_ROWS = 256

# Relative tolerance on |q| = 1 for stored orientations: float32 files give ~1e-7.
_QUATERNION_NORM_TOL = 1e-3


# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------



# --------------------------------------------------------------------------------------
# Opening and structural checks
# --------------------------------------------------------------------------------------



def _get_dataset(f: h5py.File, path: Path, name: str, required: bool) -> h5py.Dataset | None:
    if name not in f:
        if required:
            raise DatasetError(path, name, "required dataset is missing")
        return None
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(path, name, f"expected a dataset, found {type(obj).__name__}")
    return obj


def _is_real_number(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def _require_real(path: Path, name: str, dset: h5py.Dataset) -> None:
    if not _is_real_number(dset.dtype):
        raise DatasetError(
            path, name, f"expected a real integer or float dtype, found {_dtype_name(dset)}"
        )



def _position_layout(path: Path, shape: tuple[int, ...], panel_shape: tuple[int, ...]) -> str:
    """``"last"`` or ``"first"``: the positions layout, disambiguated by the image shape."""
    if len(shape) != 4:
        raise DatasetError(
            path, POSITIONS,
            f"expected rank 4, (n_panels, H, W, 3) or (3, n_panels, H, W), found shape {shape}",
        )
    last_ok = shape[3] == 3 and shape[:3] == panel_shape
    first_ok = shape[0] == 3 and shape[1:] == panel_shape
    if last_ok:  # skopi's layout wins a tie (e.g. n_panels == 3 and W == 3)
        return "last"
    if first_ok:
        return "first"
    if shape[3] != 3 and shape[0] != 3:
        raise DatasetError(
            path, POSITIONS,
            f"expected one axis of length 3 (first or last), found shape {shape}",
        )
    found = shape[:3] if shape[3] == 3 else shape[1:]
    raise DatasetError(
        path, POSITIONS,
        f"detector shape {found} differs from intensities' (n_panels, H, W) = {panel_shape}",
    )



def _inspect_open(f: h5py.File, path: Path) -> DatasetInfo:
    inten = _get_dataset(f, path, INTENSITIES, required=True)
    if inten.ndim != 4:
        raise DatasetError(
            path, INTENSITIES, f"expected rank 4 (N, n_panels, H, W), found shape {inten.shape}"
        )
    _require_real(path, INTENSITIES, inten)
    n_images = int(inten.shape[0])
    panel_shape = tuple(int(n) for n in inten.shape[1:])
    if n_images < 1:
        raise DatasetError(
            path, INTENSITIES, f"expected at least 1 image, found shape {inten.shape}"
        )
    if min(panel_shape) < 1:
        raise DatasetError(path, INTENSITIES, f"empty detector: shape {inten.shape}")

    pos = _get_dataset(f, path, POSITIONS, required=True)
    layout = _position_layout(path, tuple(pos.shape), panel_shape)
    _require_real(path, POSITIONS, pos)

    index_map = _get_dataset(f, path, INDEX_MAP, required=False)
    if index_map is not None:
        expected = panel_shape + (2,)
        if tuple(index_map.shape) != expected:
            raise DatasetError(
                path, INDEX_MAP, f"expected shape {expected}, found {tuple(index_map.shape)}"
            )
        if not np.issubdtype(index_map.dtype, np.integer):
            raise DatasetError(
                path, INDEX_MAP, f"expected an integer dtype, found {_dtype_name(index_map)}"
            )

    orient = _get_dataset(f, path, ORIENTATIONS, required=False)
    if orient is not None:
        shape = tuple(orient.shape)
        if shape not in ((n_images, 4), (n_images, 1, 4)):
            raise DatasetError(
                path, ORIENTATIONS,
                f"expected shape ({n_images}, 4) or ({n_images}, 1, 4), found {shape}",
            )
        _require_real(path, ORIENTATIONS, orient)

    mask = _get_dataset(f, path, MASK, required=False)
    if mask is not None:
        if tuple(mask.shape) != panel_shape:
            raise DatasetError(
                path, MASK,
                f"expected shape (n_panels, H, W) = {panel_shape}, found {tuple(mask.shape)}",
            )
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise DatasetError(
                path, MASK, f"expected an integer or bool dtype, found {_dtype_name(mask)}"
            )

    return DatasetInfo(
        path=str(path),
        n_images=n_images,
        panel_shape=panel_shape,  # type: ignore[arg-type]
        intensity_dtype=_dtype_name(inten),
        position_layout=layout,
        has_orientations=orient is not None,
        has_mask=mask is not None,
        has_ground_truth=GROUND_TRUTH in f,
        attrs={k: _attr_value(v) for k, v in f.attrs.items()},
        orientations_dataset=ORIENTATIONS if orient is not None else None,
    )


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"data.format: expected one of {', '.join(FORMATS)}, found {format!r}")


def detect_format(f: h5py.File) -> str:
    """``"cxi"`` if an open file has a root ``cxi_version`` or an ``entry_1`` group, else
    ``"skopi"``."""

    return "cxi" if cxi.is_cxi(f) else "skopi"


def _inspect_any(f: h5py.File, path: Path, format: str) -> DatasetInfo:

    fmt = detect_format(f) if format == "auto" else format
    if fmt == "cxi":
        if format == "cxi" and INTENSITIES in f and not cxi.is_cxi(f):
            raise DatasetError(path, cxi.DATA_PATHS[0], "required image stack is missing (the "
                               "file looks like the skopi layout: set data.format = \"auto\" "
                               "or \"skopi\")")
        return cxi.inspect_open(f, path)
    if INTENSITIES not in f and cxi.is_cxi(f):
        raise DatasetError(path, INTENSITIES, "required dataset is missing (the file looks like "
                           "CXI: set data.format = \"auto\" or \"cxi\")")
    return _inspect_open(f, path)


def inspect_dataset(path: str | os.PathLike, format: str = "auto") -> DatasetInfo:
    """Validate a dataset's structure from its metadata and describe it (no bulk read).

    Checks that the file exists and is HDF5, that ``intensities`` and
    ``pixel_position_reciprocal`` are present with rank 4 and the same detector shape,
    that the optional ``pixel_index_map``, ``orientations`` and ``mask`` have consistent
    shapes, and that every dtype is numeric (real integer or float; ``mask`` may be bool).

    The positions layout is detected by which axis has length 3 and the detector shape
    of ``intensities``. When both layouts fit (e.g. ``n_panels == 3`` and ``W == 3``)
    skopi's ``(n_panels, H, W, 3)`` is assumed.

    CXI files are checked as described in :func:`spinifel.io.cxi.inspect_open`.

    Parameters
    ----------
    path : str or path-like
        The HDF5 file.
    format : {"auto", "skopi", "cxi"}
        The layout; ``"auto"`` detects it (see the module docstring).

    Returns
    -------
    DatasetInfo

    Raises
    ------
    DatasetError
        With a one-line message naming the file, the dataset and expected versus found.
    ConfigError
        Unknown ``format``.
    """
    _check_format(format)
    p = Path(path)
    with _open(p) as f:
        return _inspect_any(f, p, format)


# --------------------------------------------------------------------------------------
# Clipping and binning
# --------------------------------------------------------------------------------------


def _check_clip_bin(clip: int, binning: int) -> None:
    for name, v in (("clip", clip), ("binning", binning)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, found {v!r}")


def binned_shape(
    path: str | os.PathLike, panel_shape: tuple[int, int, int], clip: int, binning: int,
    dataset: str = INTENSITIES,
) -> tuple[int, int, int]:
    """Detector shape ``(n_panels, H', W')`` after clipping ``clip`` pixels per edge and
    ``binning`` 2x2 binning passes.

    Raises
    ------
    DatasetError
        If nothing is left after clipping or the clipped H, W are not multiples of
        ``2**binning``.
    """
    _check_clip_bin(clip, binning)
    n_panels, h, w = panel_shape
    hc, wc = h - 2 * clip, w - 2 * clip
    if hc < 1 or wc < 1:
        raise DatasetError(
            path, dataset,
            f"clip={clip} removes the whole {h}x{w} panel (need 2*clip < H and W)",
        )
    f = 2**binning
    if hc % f or wc % f:
        raise DatasetError(
            path, dataset,
            f"panel {h}x{w} clipped by {clip} is {hc}x{wc}, not divisible by 2**binning = {f}",
        )
    return n_panels, hc // f, wc // f


def _clip(a: np.ndarray, clip: int, lead: int) -> np.ndarray:
    """Remove ``clip`` pixels from each edge of axes ``lead, lead+1`` (rows, cols)."""
    if clip == 0:
        return a
    idx = [slice(None)] * a.ndim
    idx[lead] = slice(clip, a.shape[lead] - clip)
    idx[lead + 1] = slice(clip, a.shape[lead + 1] - clip)
    return a[tuple(idx)]


def _blocks(a: np.ndarray, f: int, lead: int) -> np.ndarray:
    """View axes ``lead, lead+1`` of size (H, W) as (H/f, f, W/f, f)."""
    h, w = a.shape[lead], a.shape[lead + 1]
    return a.reshape(a.shape[:lead] + (h // f, f, w // f, f) + a.shape[lead + 2 :])


def _bin(a: np.ndarray, binning: int, lead: int, how: str) -> np.ndarray:
    """Combine ``2**binning`` x ``2**binning`` pixel blocks: ``how`` = sum, mean or all."""
    if binning == 0:
        return a
    f = 2**binning
    b = _blocks(a, f, lead)
    axes = (lead + 1, lead + 3)
    if how == "sum":
        return b.sum(axis=axes, dtype=a.dtype)
    if how == "mean":
        return b.mean(axis=axes)
    return b.all(axis=axes)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def _read_positions(f: h5py.File, path: Path, info: DatasetInfo) -> np.ndarray:
    """Positions as (n_panels, H, W, 3) float64, validated finite and not all zero."""
    pos = np.asarray(f[POSITIONS][()], dtype=np.float64)
    if info.position_layout == "first":
        pos = np.moveaxis(pos, 0, -1)
    bad = ~np.isfinite(pos).all(axis=-1)
    if bad.any():
        p, r, c = (int(i) for i in np.argwhere(bad)[0])
        raise DatasetError(
            path, POSITIONS,
            f"expected finite values, found NaN/Inf at (panel {p}, row {r}, col {c}) "
            f"and {int(bad.sum()) - 1} other pixels",
        )
    if not pos.any():
        raise DatasetError(path, POSITIONS, "expected reciprocal positions, found all zeros")
    return np.ascontiguousarray(pos)


def _read_mask(f: h5py.File, info: DatasetInfo) -> np.ndarray:
    """Raw mask (n_panels, H, W) bool, True = good; all good when absent."""
    if not info.has_mask:
        return np.ones(info.panel_shape, dtype=bool)
    return np.asarray(f[MASK][()]) != 0


def _raw_geometry(f: h5py.File, path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Unclipped positions (n_panels, H, W, 3) float64 and mask (n_panels, H, W) bool."""
    if info.format == "cxi":
    
        return cxi.raw_geometry(f, path, info)
    return _read_positions(f, path, info), _read_mask(f, info)


def _geometry_open(
    f: h5py.File, path: Path, info: DatasetInfo, clip: int, binning: int
) -> DetectorGeometry:
    shape = binned_shape(path, info.panel_shape, clip, binning, info.images_dataset)
    raw_pos, raw_mask = _raw_geometry(f, path, info)
    pos = _bin(_clip(raw_pos, clip, 1), binning, 1, "mean")
    mask = _bin(_clip(raw_mask, clip, 1), binning, 1, "all")
    if not mask.any():
        where = MASK if info.has_mask else None
        if info.has_mask and info.format == "cxi":
        
            where = cxi.mask_name(f, cxi.locate(f, path))
        raise DatasetError(
            path, where,
            f"all {mask.size} pixels are masked after clip={clip}, binning={binning} "
            f"(a binned pixel is good only if all its pixels are good)",
        )
    positions = np.ascontiguousarray(pos.reshape(-1, 3).T)
    mask = np.ascontiguousarray(mask.reshape(-1))
    extent = float(np.sqrt((positions**2).sum(axis=0)).max())
    positions.flags.writeable = False
    mask.flags.writeable = False
    return DetectorGeometry(positions=positions, mask=mask, shape=shape, reciprocal_extent=extent)


def read_geometry(path: str | os.PathLike, clip: int = 0, binning: int = 0,
                  format: str = "auto") -> DetectorGeometry:
    """Read the detector: reciprocal pixel positions and mask, clipped and binned.

    Parameters
    ----------
    path : str or path-like
        The dataset file.
    clip : int, default 0
        Pixels removed from each edge of each panel (before binning).
    binning : int, default 0
        Number of 2x2 binning passes (1 = 2x2, 2 = 4x4), as the original's ``N_binning``.
        Positions are averaged over a block; the block is a good pixel only if all its
        pixels are good, because the summed photon count of a partly masked block would be
        biased low against the model slice at the block's mean position.
    format : {"auto", "skopi", "cxi"}
        The layout (see the module docstring). CXI positions are computed from the
        detector geometry (:mod:`spinifel.io.cxi`), per module, before clipping and binning.

    Returns
    -------
    DetectorGeometry
        Positions (3, n_pixels) float64 in inverse metres, mask (n_pixels,) bool.

    Raises
    ------
    DatasetError
        Structural problems (see :func:`inspect_dataset`), non-finite or all-zero
        positions, clipped H/W not divisible by ``2**binning``, all pixels masked.
    ConfigError
        Negative or non-integer ``clip`` / ``binning``, unknown ``format``.
    """
    _check_clip_bin(clip, binning)
    _check_format(format)
    p = Path(path)
    with _open(p) as f:
        info = _inspect_any(f, p, format)
        return _geometry_open(f, p, info, clip, binning)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def shard_bounds(
    n_images: int, n_ranks: int, rank: int, path: object = "<dataset>"
) -> tuple[int, int]:
    """File rows ``[start, stop)`` read by ``rank`` of ``n_ranks`` (contiguous blocks whose
    sizes differ by at most one, in rank order; see
    :func:`spinifel.parallel.partition.block_range`).

    Parameters
    ----------
    n_images : int
        Number of images in the file.
    n_ranks : int
        Number of ranks, >= 1.
    rank : int
        This rank, ``0 <= rank < n_ranks``.
    path : optional
        The dataset, named in the error message.

    Raises
    ------
    DatasetError
        If ``n_images < n_ranks``: every rank must hold at least one image.
    """
    if n_images < n_ranks:
        raise DatasetError(
            path, INTENSITIES,
            f"{n_images} images cannot be shared by {n_ranks} ranks: "
            "need at least one image per rank",
        )
    return block_range(n_images, n_ranks, rank)


def _pixel_label(shape: tuple[int, ...], flat: int, clip: int) -> str:
    p, r, c = np.unravel_index(flat, shape)
    return f"(panel {p}, row {r + clip}, col {c + clip})"


def _validate_chunk(
    x: np.ndarray, good: np.ndarray, row0: int, path: Path, negative: str, clip: int,
    dataset: str = INTENSITIES,
) -> int:
    """Check a chunk (n, n_panels, Hc, Wc) float32 of clipped images in place.

    Only good pixels are checked. Returns the number of negative values clipped.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    gflat = good.reshape(-1)
    xg = flat[:, gflat]
    bad = ~np.isfinite(xg)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        pix = _pixel_label(good.shape, int(np.flatnonzero(gflat)[j]), clip)
        raise DatasetError(
            path, dataset,
            f"image {row0 + i} (file row {row0 + i}): expected finite values, found "
            f"{xg[i, j]} at good pixel {pix}",
        )
    neg = xg < 0
    if neg.any():
        if negative == "error":
            i, j = np.argwhere(neg)[0]
            pix = _pixel_label(good.shape, int(np.flatnonzero(gflat)[j]), clip)
            raise DatasetError(
                path, dataset,
                f"image {row0 + i} (file row {row0 + i}): expected photon counts >= 0, found "
                f"{xg[i, j]} at good pixel {pix} (set negative='clip' to clip them to 0)",
            )
        np.maximum(x, 0, out=x)
        return int(neg.sum())
    return 0


def read_shard(
    path: str | os.PathLike,
    start: int,
    stop: int,
    clip: int = 0,
    binning: int = 0,
    negative: str = "error",
    geometry: DetectorGeometry | None = None,
    format: str = "auto",
) -> ImageShard:
    """Read and validate the images of file rows ``[start, stop)`` only.

    Only those rows are read from disk (h5py slicing, in chunks of a few hundred rows).
    The images are converted to float32, clipped, checked, binned (2x2 blocks summed) and
    flattened like :attr:`DetectorGeometry.positions`. Masked pixels (after clipping and
    binning) are set to 0 in the result, so a NaN or negative value in a bad pixel never
    reaches later stages; the checks below apply to good pixels only.

    Parameters
    ----------
    path : str or path-like
        The dataset file.
    start, stop : int
        Rows ``0 <= start <= stop <= N``; see :func:`shard_bounds`.
    clip, binning : int
        As for :func:`read_geometry`.
    negative : {"error", "clip"}
        What to do with negative photon counts at good pixels: raise, or clip them to 0
        and log a warning on the ``spinifel`` logger.
    geometry : DetectorGeometry, optional
        The result of ``read_geometry(path, clip, binning)`` if the caller already has it
        (its mask is used); read here otherwise.
    format : {"auto", "skopi", "cxi"}
        The layout (see the module docstring).

    Returns
    -------
    ImageShard
        ``images`` (stop - start, n_pixels) float32, ``orientations`` (stop - start, 4)
        float64 unit quaternions or None.

    Raises
    ------
    DatasetError
        Structural problems, or for the first offending image (named by its file row): a
        NaN/Inf or (with ``negative="error"``) negative value at a good pixel, or no
        nonzero good pixel; non-finite or non-unit ground-truth quaternions.
    ConfigError
        Bad ``negative``, ``clip``, ``binning`` or ``format``.
    """
    if negative not in ("error", "clip"):
        raise ConfigError(f"negative: expected 'error' or 'clip', found {negative!r}")
    _check_clip_bin(clip, binning)
    _check_format(format)
    p = Path(path)
    with _open(p) as f:
        info = _inspect_any(f, p, format)
        images_name = info.images_dataset
        n = info.n_images
        if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
                and 0 <= start <= stop <= n):
            raise DatasetError(
                p, images_name, f"expected rows 0 <= start <= stop <= {n}, found [{start}, {stop})"
            )
        start, stop = int(start), int(stop)
        shape = binned_shape(p, info.panel_shape, clip, binning, images_name)
        if geometry is None:
            geometry = _geometry_open(f, p, info, clip, binning)
        elif tuple(geometry.shape) != shape:
            raise DatasetError(
                p, images_name,
                f"geometry shape {tuple(geometry.shape)} does not match the dataset's "
                f"{shape} after clip={clip}, binning={binning}",
            )
        good_b = np.asarray(geometry.mask).reshape(shape)
        # A raw pixel is checked if it lies in a good binned pixel; raw pixels of a
        # masked block are ignored like the block itself.
        f_bin = 2**binning
        good_raw = np.repeat(np.repeat(good_b, f_bin, axis=1), f_bin, axis=2)

        images = np.empty((stop - start, geometry.n_pixels), dtype=np.float32)
        dset = f[images_name]
        n_clipped = 0
        for a in range(start, stop, _CHUNK_ROWS):
            b = min(a + _CHUNK_ROWS, stop)
            # A CXI stack of rank 3 (N, H, W) is one module: view it as (N, 1, H, W).
            rows = np.asarray(dset[a:b]).reshape((b - a,) + tuple(info.panel_shape))
            with np.errstate(over="ignore"):  # float64 beyond float32 -> inf, caught below
                x = np.array(_clip(rows, clip, 2), dtype=np.float32)
            n_clipped += _validate_chunk(x, good_raw, a, p, negative, clip, images_name)
            x[:, ~good_raw] = 0  # before binning: NaN in a bad pixel must not spread
            xb = _bin(x, binning, 2, "sum").reshape(b - a, -1)
            empty = ~np.any(xb[:, geometry.mask] != 0, axis=1)
            if empty.any():
                i = int(np.argmax(empty))
                raise DatasetError(
                    p, images_name,
                    f"image {a + i} (file row {a + i}): expected some photons, found all "
                    f"{int(geometry.mask.sum())} good pixels zero",
                )
            images[a - start : b - start] = xb
        if n_clipped:
            log.warning(
                "%s:%s: clipped %d negative photon counts to 0 in rows [%d, %d)",
                p, images_name, n_clipped, start, stop,
            )

        orientations = _read_orientations(f, p, info, start, stop)
    return ImageShard(start=start, stop=stop, images=images, orientations=orientations)


def _read_orientations(f: h5py.File, p: Path, info: DatasetInfo, start: int, stop: int
                       ) -> np.ndarray | None:
    """Rows ``[start, stop)`` of the ground-truth quaternions, normalised, ``(n, 4)``
    float64; None when the file has none. DatasetError for a non-finite or non-unit one."""
    if not info.has_orientations:
        return None
    q_name = info.orientations_dataset or ORIENTATIONS
    q = np.asarray(f[q_name][start:stop], dtype=np.float64).reshape(stop - start, 4)
    norm = np.linalg.norm(q, axis=1)
    bad = ~np.isfinite(norm) | (np.abs(norm - 1) > _QUATERNION_NORM_TOL)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(
            p, q_name,
            f"row {start + i}: expected a finite unit quaternion [w, x, y, z], "
            f"found norm {norm[i]}",
        )
    return q / norm[:, None]
