"""Types and HDF5 helpers shared by the dataset readers (:mod:`spinifel.io.dataset`, skopi
layout, and :mod:`spinifel.io.cxi`, CXIDB): both import this module and neither imports the
other's internals here, so the two readers have no import cycle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spinifel.errors import DatasetError

# dataset names of the skopi layout (spinifel.io.dataset)
INTENSITIES = "intensities"
POSITIONS = "pixel_position_reciprocal"
INDEX_MAP = "pixel_index_map"
ORIENTATIONS = "orientations"
MASK = "mask"
GROUND_TRUTH = "ground_truth"


@dataclass(frozen=True)
class DatasetInfo:
    """Structure of a dataset file, from metadata only (no bulk read).

    Attributes
    ----------
    path : str
        The file.
    n_images : int
        Number of images N (first axis of ``intensities``), >= 1.
    panel_shape : tuple of int
        ``(n_panels, H, W)`` as stored, before clipping and binning.
    intensity_dtype : str
        numpy name of the stored dtype of ``intensities`` (e.g. ``"float32"``).
    position_layout : str
        ``"last"`` for ``(n_panels, H, W, 3)`` (skopi) or ``"first"`` for
        ``(3, n_panels, H, W)``; ``"cxi"`` when computed from a CXI detector geometry.
    has_orientations, has_mask, has_ground_truth : bool
        Whether the optional datasets / group are present.
    attrs : dict
        The file's root attributes converted to plain Python values (bytes decoded,
        arrays as lists).
    format : str
        ``"skopi"`` or ``"cxi"``.
    images_dataset : str
        Path of the image stack in the file (``intensities`` or e.g.
        ``entry_1/data_1/data``); a CXI stack of rank 3 is read as one module.
    orientations_dataset : str or None
        Path of the ground-truth orientations, when present.
    """

    path: str
    n_images: int
    panel_shape: tuple[int, int, int]
    intensity_dtype: str
    position_layout: str
    has_orientations: bool
    has_mask: bool
    has_ground_truth: bool
    attrs: dict = field(default_factory=dict, compare=False)
    format: str = "skopi"
    images_dataset: str = INTENSITIES
    orientations_dataset: str | None = None


@dataclass(frozen=True)
class DetectorGeometry:
    """Detector after clipping and binning (arrays are read-only).

    Attributes
    ----------
    positions : ndarray, shape (3, n_pixels), float64
        Reciprocal position ``s`` of each pixel in inverse metres (``|s| = 2 sin(theta) /
        lambda``), flattened in ``(panel, row, col)`` C order. A binned pixel's position
        is the mean of its pixels' positions.
    mask : ndarray, shape (n_pixels,), bool
        True = good pixel. A binned pixel is good only if all its pixels are good.
    shape : tuple of int
        ``(n_panels, H', W')`` after clipping and binning.
    reciprocal_extent : float
        ``max |s|`` over all pixels, good or not, in inverse metres.
    """

    positions: np.ndarray
    mask: np.ndarray
    shape: tuple[int, int, int]
    reciprocal_extent: float

    @property
    def n_pixels(self) -> int:
        """Number of pixels ``n_panels * H' * W'``."""
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class ImageShard:
    """The images of rows ``[start, stop)`` of the file, as one rank holds them.

    Attributes
    ----------
    start, stop : int
        File rows ``[start, stop)``.
    images : ndarray, shape (stop - start, n_pixels), float32
        Photons per (clipped, binned) pixel, flattened like
        :attr:`DetectorGeometry.positions`; masked pixels are 0.
    orientations : ndarray, shape (stop - start, 4), float64, or None
        Ground-truth unit quaternions ``[w, x, y, z]`` when the file has them.
    """

    start: int
    stop: int
    images: np.ndarray
    orientations: np.ndarray | None

    @property
    def n_images(self) -> int:
        """Number of images in the shard."""
        return self.stop - self.start



@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open ``path`` read-only; turn every HDF5/OS failure into a :class:`DatasetError`."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(p, None, "file not found")
    if not p.is_file():
        raise DatasetError(p, None, "expected an HDF5 file, found a directory or special file")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DatasetError(
            p, None, f"not a readable HDF5 file (truncated or corrupt?): {_one_line(exc)}"
        ) from exc
    try:
        with f:
            yield f
    except OSError as exc:
        # h5py raises OSError when the data of a truncated/corrupt file cannot be read.
        raise DatasetError(
            p, None, f"cannot read HDF5 data (truncated or corrupt file?): {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())



def _dtype_name(dset: h5py.Dataset) -> str:
    try:
        return str(np.dtype(dset.dtype))
    except TypeError:  # pragma: no cover - exotic HDF5 types without a numpy equivalent
        return repr(dset.dtype)



def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_attr_value(x) for x in v.tolist()] if v.dtype.kind in "SO" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v

