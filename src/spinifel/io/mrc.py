"""Minimal MRC2014 reader and writer for 3D float32 volumes.

Only what spinifel needs: mode 2 (float32) volumes, no extended header written. The
header layout follows the MRC2014 specification (Cheng et al., J. Struct. Biol. 192
(2015) 146-150; https://www.ccpem.ac.uk/mrc_format/mrc2014.php).

Axis convention: our volumes are indexed ``vol[ix, iy, iz]`` (axis 0 = x). MRC stores x
fastest (columns), then y (rows), then z (sections), so the file body is
``vol.transpose(2, 1, 0)`` in C order, with ``mapc, mapr, maps = 1, 2, 3``.

The grid origin: ``nxstart = nystart = nzstart = -(n // 2)``, so voxel index ``n // 2``
(the centre voxel ``(M-1)/2`` of spinifel's odd grids) sits at coordinate 0 and viewers
place the molecule's centre at the origin; the ``origin`` field is 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spinifel.errors import DatasetError

HEADER_BYTES = 1024
MODE_FLOAT32 = 2
NVERSION = 20140

# Byte offsets are those of the MRC2014 specification.
_HEADER = np.dtype(
    [
        ("nx", "<i4"), ("ny", "<i4"), ("nz", "<i4"),
        ("mode", "<i4"),
        ("nxstart", "<i4"), ("nystart", "<i4"), ("nzstart", "<i4"),
        ("mx", "<i4"), ("my", "<i4"), ("mz", "<i4"),
        ("cella", "<f4", 3),
        ("cellb", "<f4", 3),
        ("mapc", "<i4"), ("mapr", "<i4"), ("maps", "<i4"),
        ("dmin", "<f4"), ("dmax", "<f4"), ("dmean", "<f4"),
        ("ispg", "<i4"),
        ("nsymbt", "<i4"),
        ("extra1", "V8"),
        ("exttyp", "S4"),
        ("nversion", "<i4"),
        ("extra2", "V84"),
        ("origin", "<f4", 3),
        ("map", "S4"),
        ("machst", "u1", 4),
        ("rms", "<f4"),
        ("nlabl", "<i4"),
        ("label", "S80", 10),
    ]
)

_MACHST_LITTLE = (0x44, 0x44, 0x00, 0x00)
_MACHST_BIG = (0x11, 0x11, 0x00, 0x00)


def write_mrc(
    path: str | os.PathLike,
    volume: np.ndarray,
    voxel_size_angstrom: float,
    label: str | None = None,
) -> None:
    """Write a 3D volume as a little-endian MRC2014 file, mode 2 (float32).

    Not atomic by itself: :func:`spinifel.io.output.write_result` wraps it in
    :func:`spinifel.io.output.atomic_write`.

    Parameters
    ----------
    path : str or path-like
        File to write (overwritten).
    volume : ndarray, shape (nx, ny, nz), real
        Indexed ``volume[ix, iy, iz]``; converted to float32.
    voxel_size_angstrom : float
        Voxel edge in angstrom (> 0): ``cella = n * voxel_size``. For a reciprocal-space
        volume pass its reciprocal voxel spacing (the header then holds inverse angstrom).
    label : str, optional
        One 80-character label (default "spinifel-mpi <version>").

    Raises
    ------
    ValueError
        Not a real 3D array, or a non-positive / non-finite voxel size.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"MRC volume: expected a non-empty 3D array, found shape {vol.shape}")
    if np.iscomplexobj(vol) or not (np.issubdtype(vol.dtype, np.number) or vol.dtype == bool):
        raise ValueError(f"MRC volume: expected a real array, found dtype {vol.dtype}")
    voxel = float(voxel_size_angstrom)
    if not np.isfinite(voxel) or voxel <= 0:
        raise ValueError(
            f"MRC voxel size: expected a finite value > 0, found {voxel_size_angstrom}"
        )
    data = np.ascontiguousarray(vol.astype("<f4").transpose(2, 1, 0))
    nx, ny, nz = vol.shape
    d64 = data.astype(np.float64)

    h = np.zeros((), dtype=_HEADER)
    h["nx"], h["ny"], h["nz"] = nx, ny, nz
    h["mode"] = MODE_FLOAT32
    h["nxstart"], h["nystart"], h["nzstart"] = -(nx // 2), -(ny // 2), -(nz // 2)
    h["mx"], h["my"], h["mz"] = nx, ny, nz
    h["cella"] = (nx * voxel, ny * voxel, nz * voxel)
    h["cellb"] = (90.0, 90.0, 90.0)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    h["dmin"], h["dmax"], h["dmean"] = d64.min(), d64.max(), d64.mean()
    h["rms"] = d64.std()  # MRC2014: RMS deviation from the mean
    h["ispg"] = 1  # a single volume (P1); 0 would mean an image stack
    h["nsymbt"] = 0
    h["exttyp"] = b"\0\0\0\0"
    h["nversion"] = NVERSION
    h["origin"] = (0.0, 0.0, 0.0)
    h["map"] = b"MAP "
    h["machst"] = _MACHST_LITTLE
    if label is None:
        from spinifel import __version__

        label = f"spinifel-mpi {__version__}"
    h["nlabl"] = 1
    labels = [b" " * 80] * 10
    labels[0] = label.encode("ascii", "replace")[:80].ljust(80)
    h["label"] = labels

    with open(path, "wb") as f:
        f.write(h.tobytes())
        f.write(data.tobytes())


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a mode-2 (float32) MRC volume written by :func:`write_mrc` or another program.

    Parameters
    ----------
    path : str or path-like
        The MRC file (either byte order, any extended header, any axis mapping).

    Returns
    -------
    volume : ndarray, shape (nx, ny, nz), float32
        Indexed ``volume[ix, iy, iz]``.
    voxel_size : float
        ``cella_x / mx`` (angstrom for a real-space map).

    Raises
    ------
    DatasetError
        Missing or truncated file, not MRC, unsupported mode, anisotropic voxels.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(p, None, "MRC file not found")
    raw = p.read_bytes()
    if len(raw) < HEADER_BYTES:
        raise DatasetError(
            p, None, f"expected an MRC header of {HEADER_BYTES} bytes, found {len(raw)} bytes"
        )
    machst = tuple(raw[212:214])
    big = machst == _MACHST_BIG[:2]
    dt = _HEADER.newbyteorder(">") if big else _HEADER
    h = np.frombuffer(raw[:HEADER_BYTES], dtype=dt)[0]
    if bytes(h["map"]) != b"MAP ":
        raise DatasetError(p, None, f"expected 'MAP ' at byte 208, found {bytes(h['map'])!r}")
    if int(h["mode"]) != MODE_FLOAT32:
        raise DatasetError(p, None, f"expected MRC mode 2 (float32), found mode {int(h['mode'])}")
    n = (int(h["nx"]), int(h["ny"]), int(h["nz"]))
    axes = (int(h["mapc"]), int(h["mapr"]), int(h["maps"]))
    if sorted(axes) != [1, 2, 3] or min(n) < 1:
        raise DatasetError(p, None, f"invalid header: n = {n}, mapc/mapr/maps = {axes}")
    offset = HEADER_BYTES + int(h["nsymbt"])
    count = n[0] * n[1] * n[2]
    if len(raw) < offset + 4 * count:
        raise DatasetError(
            p, None, f"truncated: expected {offset + 4 * count} bytes, found {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=">f4" if big else "<f4", count=count, offset=offset)
    # Stored as [section, row, column]; column is axis mapc (1 = x), etc.
    stored = data.reshape(n[2], n[1], n[0])
    axis_of = {axes[0]: 2, axes[1]: 1, axes[2]: 0}  # MRC axis (1=x, 2=y, 3=z) -> stored axis
    vol = np.ascontiguousarray(
        stored.transpose(axis_of[1], axis_of[2], axis_of[3]), dtype=np.float32
    )
    # Sampling along x, y, z: mx, my, mz; cella along x, y, z.
    m = np.array([int(h["mx"]), int(h["my"]), int(h["mz"])], dtype=np.float64)
    if np.any(m < 1):
        raise DatasetError(p, None, f"invalid header: mx, my, mz = {tuple(int(v) for v in m)}")
    sizes = np.asarray(h["cella"], dtype=np.float64) / m
    if not np.allclose(sizes, sizes[0], rtol=1e-5, atol=0):
        raise DatasetError(p, None, f"expected cubic voxels, found voxel sizes {tuple(sizes)}")
    return vol, float(sizes[0])
