"""Reader of CXI files (CXIDB file format 1.6) for single-particle imaging stacks.

The CXI reader produces the same :class:`~spinifel.io.common.DatasetInfo`,
:class:`~spinifel.io.dataset.DetectorGeometry` and :class:`~spinifel.io.dataset.ImageShard`
as the reader of the original skopi layout; :mod:`spinifel.io.dataset` dispatches to it
(``format="cxi"``, or ``"auto"`` with a file that has ``cxi_version`` or ``entry_1``), and
clipping, binning, validation and the row-wise shard reads are shared. docs/cxi.md
describes the supported subset; in short:

=========================================== =================================== ==============
dataset                                     shape                               notes
=========================================== =================================== ==============
``entry_1/data_1/data`` (or, without it,    (N, H, W) one module or             any real dtype
``entry_1/instrument_1/detector_1/data``)   (N, n_modules, H, W)                photons/pixel
``<detector>/mask`` (optional)              (H, W) or (n_modules, H, W), int    CXI bit field
``<detector>/corner_position``              (3,), (n_modules, 3), optionally    m
                                            with a leading per-image axis N
``<detector>/basis_vectors`` (optional)     (2, 3), (n_modules, 2, 3), same     m
``<detector>/x_pixel_size``, ``y_...``      scalar                              m
``<detector>/distance``                     scalar, (1,) or (N,)                m
``<instrument>/source_1/energy`` or         scalar, (1,) or (N,)                J (photon
``.../wavelength``, or ``beam_1/incident_``                                     energy) or m
``energy`` / ``incident_wavelength``
``<detector>/module_identifier`` (opt.)     (n_modules,) strings                checked only
``orientations`` or ``entry_1/orientations``(N, 4) or (N, 1, 4)                 ground truth
``ground_truth`` (optional)                 group, as in the skopi layout       evaluation
=========================================== =================================== ==============

``<detector>`` is the group that ``entry_1/data_1/data`` soft-links into (or that
``entry_1/data_1`` itself links to), else ``entry_1/instrument_1/detector_1``;
``<instrument>`` is its parent group.

Geometry (CXI 1.6, section "The orientation of pixel detectors"): laboratory frame with the
sample at the origin, ``z`` along the beam (downstream), ``y`` up, ``x`` completing a
right-handed frame, SI units. Row ``k`` of ``basis_vectors`` is the step between the centres
of neighbouring pixels along data axis ``k``: row 0 along the slow axis (image rows, ``i``),
row 1 along the fast axis (columns, ``j``). ``corner_position`` is the outer corner of the
first pixel, half a step before its centre along both axes, so the centre of pixel
``(i, j)`` of module ``m`` is::

    corner_position[m] + (i + 1/2) * basis_vectors[m, 0] + (j + 1/2) * basis_vectors[m, 1]

Without ``basis_vectors`` the CXI default ``[[0, -y_pixel_size, 0], [-x_pixel_size, 0, 0]]``
applies. Without ``corner_position`` (single module only) the module is centred on the beam
at ``z = distance``. The reciprocal position is then ``s = (u - e_z) / lambda`` with ``u``
the unit vector to the pixel centre (:func:`spinifel.geometry.detector.reciprocal_from_lab`).

Mask: a CXI mask is a bit field where a *set* bit marks a defect (the opposite polarity of
the skopi ``mask``, where nonzero means good). A pixel carries no weight when any bit of
:data:`NO_WEIGHT_BITS` is set; the other bits are informational and ignored.

Units: a dataset may carry a ``units`` attribute (lengths: ``m``, ``mm``, ``um``, ``nm``,
``angstrom``; energies: ``J``, ``eV``, ``keV``); without one the CXI default (SI) applies.
A per-image ``distance`` or photon energy is accepted when its values agree to
:data:`PER_IMAGE_RTOL` (their mean is used): one geometry serves every image.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from spinifel.errors import DatasetError
from spinifel.geometry.detector import reciprocal_from_lab
from spinifel.io.common import DatasetInfo, _attr_value, _dtype_name, _open

log = logging.getLogger("spinifel")

# CXI pixel-mask bits as defined by Cheetah (antonbarty/cheetah-2017,
# source/libcheetah/include/detectorObject.h, "oriented along conventions defined for CXI
# file format") and Condor (FXIhub/condor, src/utils/pixelmask.py); docs/cxi.md.
CXI_PIXEL_IS_INVALID = 0x1
CXI_PIXEL_IS_SATURATED = 0x2
CXI_PIXEL_IS_HOT = 0x4
CXI_PIXEL_IS_DEAD = 0x8
CXI_PIXEL_IS_SHADOWED = 0x10
CXI_PIXEL_IS_IN_PEAKMASK = 0x20  # informational (hit finding)
CXI_PIXEL_IS_TO_BE_IGNORED = 0x40
CXI_PIXEL_IS_BAD = 0x80
CXI_PIXEL_IS_OUT_OF_RESOLUTION_LIMITS = 0x100  # informational (a hit finder's range)
CXI_PIXEL_IS_MISSING = 0x200
CXI_PIXEL_IS_NOISY = 0x400
CXI_PIXEL_IS_ARTIFACT_CORRECTED = 0x800  # informational: the correction succeeded
CXI_PIXEL_FAILED_ARTIFACT_CORRECTION = 0x1000  # e.g. Cheetah's common mode failed
CXI_PIXEL_IS_PEAK_FOR_HITFINDER = 0x2000  # informational (hit finding)
CXI_PIXEL_IS_PHOTON_BACKGROUND_CORRECTED = 0x4000  # informational
CXI_PIXEL_IS_IN_JET = 0x8000  # Cheetah only: the liquid jet's streak

#: Mask bits that remove a pixel from the reconstruction: its value is not a valid photon
#: count of the particle's scattered wave (invalid, saturated, hot, dead, shadowed, to be
#: ignored, bad, missing (a gap of a modular detector), noisy, failed artifact correction
#: (the offset was not removed), in the jet streak). Peak-mask, resolution-limit,
#: artifact-corrected, hit-finder-peak and background-corrected bits describe a good pixel
#: and are ignored, as are the bits above 0x8000.
NO_WEIGHT_BITS = (CXI_PIXEL_IS_INVALID | CXI_PIXEL_IS_SATURATED | CXI_PIXEL_IS_HOT
                  | CXI_PIXEL_IS_DEAD | CXI_PIXEL_IS_SHADOWED | CXI_PIXEL_IS_TO_BE_IGNORED
                  | CXI_PIXEL_IS_BAD | CXI_PIXEL_IS_MISSING | CXI_PIXEL_IS_NOISY
                  | CXI_PIXEL_FAILED_ARTIFACT_CORRECTION | CXI_PIXEL_IS_IN_JET)

#: Largest relative spread accepted in a per-image ``distance`` / photon energy (0.1 %).
PER_IMAGE_RTOL = 1e-3
#: Largest relative disagreement accepted between a file's photon energy and wavelength.
ENERGY_WAVELENGTH_RTOL = 1e-3
#: Photon energies above this many joules (6.2 MeV) are taken as a unit mistake (eV in a J
#: field): SPI uses 1-25 keV, i.e. 1.6e-16 to 4e-15 J.
MAX_PLAUSIBLE_ENERGY_J = 1e-12

ELEMENTARY_CHARGE_C = 1.602176634e-19  # exact (SI 2019): joules per electronvolt
PLANCK_J_S = 6.62607015e-34  # exact (SI 2019)
SPEED_OF_LIGHT_M_S = 299792458.0  # exact

DATA_PATHS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")
DEFAULT_DETECTOR = "entry_1/instrument_1/detector_1"
ORIENTATION_PATHS = ("orientations", "entry_1/orientations")
GROUND_TRUTH = "ground_truth"

_LENGTH_UNITS = {"m": 1.0, "meter": 1.0, "metre": 1.0, "meters": 1.0, "metres": 1.0,
                 "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9,
                 "angstrom": 1e-10, "a": 1e-10, "å": 1e-10}
_ENERGY_UNITS = {"j": 1.0, "joule": 1.0, "joules": 1.0, "ev": ELEMENTARY_CHARGE_C,
                 "kev": 1e3 * ELEMENTARY_CHARGE_C}


def is_cxi(f: h5py.File) -> bool:
    """Whether an open file looks like CXI: a root ``cxi_version`` (dataset or attribute)
    or an ``entry_1`` group."""
    return "cxi_version" in f or "cxi_version" in f.attrs or "entry_1" in f


@dataclass(frozen=True)
class CXILayout:
    """Where the parts of a CXI file are (paths inside the file, no leading slash)."""

    data: str
    detector: str | None
    instrument: str | None


@dataclass(frozen=True)
class CXIGeometry:
    """The detector and beam of a CXI file, in SI units.

    Attributes
    ----------
    wavelength_m : float
        X-ray wavelength.
    corner_position : ndarray, shape (n_modules, 3), float64
        Outer corner of each module's first pixel, metres.
    basis_vectors : ndarray, shape (n_modules, 2, 3), float64
        Row 0: step between pixel centres along the slow axis (rows); row 1: along the fast
        axis (columns); metres.
    wavelength_source : str
        The dataset the wavelength came from.
    centred : bool
        True when ``corner_position`` was absent and the module was centred on the beam.
    """

    wavelength_m: float
    corner_position: np.ndarray
    basis_vectors: np.ndarray
    wavelength_source: str
    centred: bool

    def pixel_centres(self, shape: tuple[int, int]) -> np.ndarray:
        """Laboratory positions of the pixel centres, shape (n_modules, H, W, 3), metres."""
        h, w = shape
        i = (np.arange(h, dtype=np.float64) + 0.5)[None, :, None, None]
        j = (np.arange(w, dtype=np.float64) + 0.5)[None, None, :, None]
        c = self.corner_position[:, None, None, :]
        b0 = self.basis_vectors[:, 0][:, None, None, :]
        b1 = self.basis_vectors[:, 1][:, None, None, :]
        return c + i * b0 + j * b1


# --------------------------------------------------------------------------------------
# Locating the parts
# --------------------------------------------------------------------------------------


def _soft_target(group: h5py.Group, name: str) -> str | None:
    """Absolute target path (no leading slash) of soft link ``group/name``, else None."""
    try:
        link = group.get(name, getlink=True)
    except (KeyError, OSError):
        return None
    if not isinstance(link, h5py.SoftLink):
        return None
    target = link.path
    if not target.startswith("/"):
        target = posixpath.join(group.name, target)
    return posixpath.normpath(target).lstrip("/")


def locate(f: h5py.File, path: Path) -> CXILayout:
    """Find the image stack, the detector group and the instrument group.

    Raises
    ------
    DatasetError
        If neither ``entry_1/data_1/data`` nor ``entry_1/instrument_1/detector_1/data``
        exists or the one found is not a dataset.
    """
    data = next((p for p in DATA_PATHS if p in f), None)
    if data is None:
        raise DatasetError(path, DATA_PATHS[0], "required image stack is missing (expected "
                           f"{DATA_PATHS[0]} or {DATA_PATHS[1]})")
    if not isinstance(f[data], h5py.Dataset):
        raise DatasetError(path, data, f"expected a dataset, found {type(f[data]).__name__}")
    detector = None
    if data == DATA_PATHS[0]:
        target = _soft_target(f["entry_1/data_1"], "data")
        if target is not None:
            detector = posixpath.dirname(target)
        else:
            detector = _soft_target(f["entry_1"], "data_1")
    else:
        detector = DEFAULT_DETECTOR
    if detector is None or detector not in f or not isinstance(f[detector], h5py.Group):
        detector = DEFAULT_DETECTOR if DEFAULT_DETECTOR in f else None
    instrument = posixpath.dirname(detector) if detector else None
    if instrument == "" or (instrument is not None and instrument not in f):
        instrument = None
    return CXILayout(data=data, detector=detector, instrument=instrument)


# --------------------------------------------------------------------------------------
# Reading numbers
# --------------------------------------------------------------------------------------


def _dataset(f: h5py.File, path: Path, name: str) -> h5py.Dataset:
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(path, name, f"expected a dataset, found {type(obj).__name__}")
    if not (np.issubdtype(obj.dtype, np.integer) or np.issubdtype(obj.dtype, np.floating)):
        raise DatasetError(path, name, f"expected a real number dtype, found {obj.dtype}")
    return obj


def _unit_factor(path: Path, name: str, dset: h5py.Dataset, table: dict, default: str) -> float:
    units = dset.attrs.get("units")
    if units is None:
        return 1.0
    if isinstance(units, np.ndarray):
        units = units.reshape(-1)[0] if units.size else ""
    if isinstance(units, bytes):
        units = units.decode("utf-8", "replace")
    key = str(units).strip().lower()
    if key not in table:
        raise DatasetError(path, name, f"unknown units attribute {str(units)!r} (expected one "
                           f"of {', '.join(sorted(set(table)))}; default {default})")
    return table[key]


def _read_scalar(f: h5py.File, path: Path, name: str, n_images: int, table: dict,
                 default: str) -> float:
    """A positive quantity stored as a scalar, (1,) or one value per image (N,), in SI."""
    dset = _dataset(f, path, name)
    v = np.asarray(dset[()], dtype=np.float64)
    if v.shape not in ((), (1,), (n_images,)):
        raise DatasetError(path, name, f"expected a scalar, shape (1,) or one value per image "
                           f"({n_images},), found shape {v.shape}")
    v = v.reshape(-1)
    bad = ~np.isfinite(v) | (v <= 0)
    if bad.any():
        raise DatasetError(path, name, f"expected a positive finite value, found "
                           f"{v[np.argmax(bad)]!r}")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo > PER_IMAGE_RTOL * hi:
        raise DatasetError(path, name, f"values vary from {lo:.6g} to {hi:.6g} between images "
                           f"(more than {PER_IMAGE_RTOL:g} relative): per-image geometry is "
                           "not supported")
    return float(v.mean()) * _unit_factor(path, name, dset, table, default)


def _read_per_module(f: h5py.File, path: Path, name: str, n_images: int, n_modules: int,
                     tail: tuple[int, ...]) -> np.ndarray:
    """A per-module array ``(n_modules,) + tail`` in metres.

    Accepted stored shapes: ``tail`` (one module), ``(n_modules,) + tail``, and either of
    those with a leading per-image axis of length N whose rows are all identical.
    """
    dset = _dataset(f, path, name)
    a = np.asarray(dset[()], dtype=np.float64)
    shape = a.shape
    want = (n_modules,) + tail
    if shape == want:
        out = a
    elif n_modules == 1 and shape == tail:
        out = a[None]
    elif shape in ((n_images,) + want, (n_images,) + tail if n_modules == 1 else None):
        if not (a == a[:1]).all():
            raise DatasetError(path, name, "values differ between images: per-image geometry "
                               "is not supported")
        out = a[0].reshape(want)
    else:
        alts = [want] + ([tail] if n_modules == 1 else [])
        alts += [(n_images,) + s for s in alts]
        raise DatasetError(path, name, f"expected shape {' or '.join(map(str, alts))} for "
                           f"{n_modules} module(s) and {n_images} images, found {shape}")
    if not np.isfinite(out).all():
        raise DatasetError(path, name, "expected finite values, found NaN/Inf")
    return out * _unit_factor(path, name, dset, _LENGTH_UNITS, "m")


def _read_wavelength(f: h5py.File, path: Path, layout: CXILayout, n_images: int
                     ) -> tuple[float, str]:
    """Wavelength (m) and the dataset it came from (a photon energy is converted)."""
    groups = []
    if layout.instrument is not None:
        groups.append((f"{layout.instrument}/source_1", "energy", "wavelength"))
        groups.append((f"{layout.instrument}/beam_1", "incident_energy", "incident_wavelength"))
    for group, e_name, w_name in groups:
        e_path, w_path = f"{group}/{e_name}", f"{group}/{w_name}"
        lam_e = lam_w = None
        if e_path in f:
            e_j = _read_scalar(f, path, e_path, n_images, _ENERGY_UNITS, "J")
            if e_j > MAX_PLAUSIBLE_ENERGY_J:
                raise DatasetError(path, e_path, f"photon energy {e_j:.6g} J is implausible "
                                   f"(> {MAX_PLAUSIBLE_ENERGY_J:g} J); CXI energies are in "
                                   "joules: add a units='eV' attribute if it is in eV")
            lam_e = PLANCK_J_S * SPEED_OF_LIGHT_M_S / e_j
        if w_path in f:
            lam_w = _read_scalar(f, path, w_path, n_images, _LENGTH_UNITS, "m")
        if (lam_e is not None and lam_w is not None
                and abs(lam_e - lam_w) > ENERGY_WAVELENGTH_RTOL * lam_w):
            raise DatasetError(path, w_path, f"wavelength {lam_w:.6g} m disagrees with "
                               f"{e_path} (photon energy gives {lam_e:.6g} m)")
        if lam_w is not None:  # the wavelength is used as stored: no constant in between
            return lam_w, w_path
        if lam_e is not None:
            return lam_e, e_path
    where = layout.instrument or "entry_1/instrument_1"
    raise DatasetError(path, f"{where}/source_1/energy", "photon energy missing: expected "
                       f"{where}/source_1/energy (J) or /wavelength (m), or "
                       f"{where}/beam_1/incident_energy or /incident_wavelength")


# --------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------


def inspect_open(f: h5py.File, path: Path):
    """Validate the structure of an open CXI file; return a ``DatasetInfo`` (no bulk read).

    Checks the image stack (rank 3 or 4, real dtype, non-empty), ``module_identifier``,
    the mask's shape and dtype and the orientations' shape. The geometry values are read
    and checked by :func:`read_cxi_geometry`.
    """

    layout = locate(f, path)
    dset = f[layout.data]
    if dset.ndim not in (3, 4):
        raise DatasetError(path, layout.data, "expected rank 3 (N, H, W) or rank 4 "
                           f"(N, n_modules, H, W), found shape {dset.shape}")
    if not (np.issubdtype(dset.dtype, np.integer) or np.issubdtype(dset.dtype, np.floating)):
        raise DatasetError(path, layout.data, f"expected a real integer or float dtype, found "
                           f"{_dtype_name(dset)}")
    n_images = int(dset.shape[0])
    panel_shape = (1,) + tuple(int(n) for n in dset.shape[1:]) if dset.ndim == 3 else tuple(
        int(n) for n in dset.shape[1:])
    if n_images < 1:
        raise DatasetError(path, layout.data, f"expected at least 1 image, found shape "
                           f"{dset.shape}")
    if min(panel_shape) < 1:
        raise DatasetError(path, layout.data, f"empty detector: shape {dset.shape}")
    n_modules, h, w = panel_shape
    det = layout.detector

    if det is not None and f"{det}/module_identifier" in f:
        name = f"{det}/module_identifier"
        ids = f[name]
        n_ids = int(ids.shape[0]) if isinstance(ids, h5py.Dataset) and ids.ndim == 1 else -1
        if n_ids != n_modules:
            raise DatasetError(path, name, f"expected one identifier per module ({n_modules}, "
                               f"from {layout.data} shape {dset.shape}), found shape "
                               f"{getattr(ids, 'shape', None)}")

    mname = mask_name(f, layout)
    if mname is not None:
        mask = f[mname]
        if not isinstance(mask, h5py.Dataset):
            raise DatasetError(path, mname, f"expected a dataset, found {type(mask).__name__}")
        ok = [(n_modules, h, w)] + ([(h, w)] if n_modules == 1 else [])
        if tuple(mask.shape) not in ok:
            raise DatasetError(path, mname, f"expected shape {' or '.join(map(str, ok))} "
                               f"to match {layout.data} {dset.shape}, found {tuple(mask.shape)}")
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise DatasetError(path, mname, f"expected an integer bit field (uint32), found "
                               f"{_dtype_name(mask)}")

    orient_name = next((p for p in ORIENTATION_PATHS if p in f), None)
    if orient_name is not None:
        q = f[orient_name]
        if not isinstance(q, h5py.Dataset):
            raise DatasetError(path, orient_name, f"expected a dataset, found {type(q).__name__}")
        if tuple(q.shape) not in ((n_images, 4), (n_images, 1, 4)):
            raise DatasetError(path, orient_name, f"expected shape ({n_images}, 4) or "
                               f"({n_images}, 1, 4), found {tuple(q.shape)}")
        if not (np.issubdtype(q.dtype, np.integer) or np.issubdtype(q.dtype, np.floating)):
            raise DatasetError(path, orient_name, f"expected a real dtype, found {_dtype_name(q)}")

    attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    if "cxi_version" in f and isinstance(f["cxi_version"], h5py.Dataset):
        attrs.setdefault("cxi_version", _attr_value(f["cxi_version"][()]))
    return DatasetInfo(
        path=str(path), n_images=n_images, panel_shape=panel_shape,  # type: ignore[arg-type]
        intensity_dtype=_dtype_name(dset), position_layout="cxi",
        has_orientations=orient_name is not None, has_mask=mname is not None,
        has_ground_truth=GROUND_TRUTH in f, attrs=attrs, format="cxi",
        images_dataset=layout.data, orientations_dataset=orient_name)


def mask_name(f: h5py.File, layout: CXILayout) -> str | None:
    """Path of the mask: ``<detector>/mask``, else ``entry_1/data_1/mask``, else None."""
    for name in ([f"{layout.detector}/mask"] if layout.detector else []) + ["entry_1/data_1/mask"]:
        if name in f:
            return name
    return None


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def read_cxi_geometry(f: h5py.File, path: Path, n_images: int,
                      panel_shape: tuple[int, int, int]) -> CXIGeometry:
    """Read and validate the detector and beam of an open CXI file.

    Raises
    ------
    DatasetError
        Missing detector group, pixel size, distance or photon energy where needed;
        non-positive or non-finite values; wrong shapes of ``corner_position`` or
        ``basis_vectors``; degenerate (parallel or zero) basis vectors; a pixel centre
        not downstream of the sample (``z <= 0``).
    """
    layout = locate(f, path)
    n_modules, h, w = panel_shape
    det = layout.detector
    if det is None:
        raise DatasetError(path, DEFAULT_DETECTOR, "detector group missing (needed for the "
                           "geometry: corner_position, basis_vectors or distance and pixel sizes)")
    wavelength, source = _read_wavelength(f, path, layout, n_images)

    bv_name = f"{det}/basis_vectors"
    if bv_name in f:
        basis = _read_per_module(f, path, bv_name, n_images, n_modules, (2, 3))
    else:
        sizes = []
        for axis in ("x", "y"):
            name = f"{det}/{axis}_pixel_size"
            if name not in f:
                raise DatasetError(path, name, f"required dataset is missing (no {bv_name} "
                                   "either: one of them gives the pixel steps)")
            sizes.append(_read_scalar(f, path, name, n_images, _LENGTH_UNITS, "m"))
        px, py = sizes
        one = np.array([[0.0, -py, 0.0], [-px, 0.0, 0.0]])  # CXI default orientation
        basis = np.repeat(one[None], n_modules, axis=0)
    norms = np.linalg.norm(basis, axis=-1)
    cross = np.linalg.norm(np.cross(basis[:, 0], basis[:, 1]), axis=-1)
    degenerate = (norms.min(axis=-1) <= 0) | (cross <= 1e-9 * norms.prod(axis=-1))
    if degenerate.any():
        m = int(np.argmax(degenerate))
        raise DatasetError(path, bv_name, f"module {m}: basis vectors {basis[m].tolist()} are "
                           "zero or parallel (expected the two pixel steps of a plane)")

    cp_name = f"{det}/corner_position"
    if cp_name in f:
        corner = _read_per_module(f, path, cp_name, n_images, n_modules, (3,))
        centred = False
    else:
        d_name = f"{det}/distance"
        if n_modules != 1:
            raise DatasetError(path, cp_name, f"required for a {n_modules}-module detector "
                               "(only a single module can be centred on the beam at distance)")
        if d_name not in f:
            raise DatasetError(path, d_name, f"required dataset is missing (no {cp_name} "
                               "either: one of them places the detector)")
        dist = _read_scalar(f, path, d_name, n_images, _LENGTH_UNITS, "m")
        # Module centre (H/2 and W/2 steps from the outer corner) on the beam at z = distance.
        corner = (np.array([0.0, 0.0, dist]) - 0.5 * h * basis[0, 0]
                  - 0.5 * w * basis[0, 1])[None]
        centred = True
    geo = CXIGeometry(wavelength_m=wavelength, corner_position=corner, basis_vectors=basis,
                      wavelength_source=source, centred=centred)
    # z is linear in (i, j): its minimum over a module is at one of the four corner pixels.
    ends = np.array([[0.5, 0.5], [h - 0.5, 0.5], [0.5, w - 0.5], [h - 0.5, w - 0.5]])
    z = (corner[:, None, 2] + ends[None, :, 0] * basis[:, None, 0, 2]
         + ends[None, :, 1] * basis[:, None, 1, 2])
    if not (z > 0).all():
        m = int(np.argmax((z <= 0).any(axis=1)))
        raise DatasetError(path, cp_name if not centred else f"{det}/distance",
                           f"module {m}: pixel centres reach z = {float(z[m].min()):.6g} m, "
                           "expected z > 0 (downstream of the sample; CXI z runs along the beam)")
    return geo


def raw_geometry(f: h5py.File, path: Path, info) -> tuple[np.ndarray, np.ndarray]:
    """Unclipped reciprocal positions (n_modules, H, W, 3) float64 in inverse metres and the
    good-pixel mask (n_modules, H, W) bool of an open CXI file (see :mod:`spinifel.io.dataset`
    for clipping and binning)."""
    geo = read_cxi_geometry(f, path, info.n_images, info.panel_shape)
    _, h, w = info.panel_shape
    pos = reciprocal_from_lab(geo.pixel_centres((h, w)), geo.wavelength_m)
    mname = mask_name(f, locate(f, path))
    if mname is None:
        good = np.ones(info.panel_shape, dtype=bool)
    else:
        bits = np.asarray(f[mname][()]).astype(np.int64).reshape(info.panel_shape)
        good = (bits & NO_WEIGHT_BITS) == 0
    return np.ascontiguousarray(pos), good


def describe_geometry(path: str | Path) -> dict:
    """The CXI geometry of a file as a JSON-ready dict (for ``spinifel-mpi info``).

    Keys: ``data``, ``detector``, ``wavelength_m``, ``wavelength_source``,
    ``photon_energy_ev``, ``corner_position_m`` (list per module), ``basis_vectors_m``,
    ``centred_on_beam``, ``no_weight_bits`` (hex string).
    """

    p = Path(path)
    with _open(p) as f:
        info = inspect_open(f, p)
        layout = locate(f, p)
        geo = read_cxi_geometry(f, p, info.n_images, info.panel_shape)
    return {
        "data": layout.data,
        "detector": layout.detector,
        "wavelength_m": geo.wavelength_m,
        "wavelength_source": geo.wavelength_source,
        "photon_energy_ev": PLANCK_J_S * SPEED_OF_LIGHT_M_S / geo.wavelength_m
        / ELEMENTARY_CHARGE_C,
        "corner_position_m": geo.corner_position.tolist(),
        "basis_vectors_m": geo.basis_vectors.tolist(),
        "centred_on_beam": geo.centred,
        "no_weight_bits": hex(NO_WEIGHT_BITS),
    }
