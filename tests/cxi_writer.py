"""Convert a dataset in the skopi layout written by ``spinifel-mpi simulate`` into a CXI file.

A plain script for the tests, independent of :mod:`spinifel.io`: it reads the skopi file
with h5py and writes CXI 1.6 by hand, so the CXI reader is checked against a writer that
does not share its code.

The simulated detector is one square ``n x n`` panel centred on the beam: pixel ``(i, j)``
sits at ``x = (j - (n-1)/2) p``, ``y = (i - (n-1)/2) p``, ``z = distance`` (the root
attributes ``pixel_size``, ``det_distance``, ``photon_energy_ev``, ``wavelength_m`` give
``p``, the distance and the beam).

Two geometries:

* ``explicit=True``: the images as stored, with ``basis_vectors = [[0, p, 0], [p, 0, 0]]``
  (rows along +y, columns along +x) and ``corner_position = (-n p / 2, -n p / 2, d)``;
* ``explicit=False``: only ``distance``, ``x_pixel_size`` and ``y_pixel_size``, i.e. the CXI
  default orientation (rows along -y, columns along -x, centred on the beam). That is the
  skopi detector turned by 180 degrees about the beam, so the images and the mask are
  written flipped along both axes: CXI pixel ``(i, j)`` is skopi pixel
  ``(n-1-i, n-1-j)``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

JOULE_PER_EV = 1.602176634e-19
SHADOWED = 0x10  # CXI_PIXEL_IS_SHADOWED: the simulated beamstop


def skopi_to_cxi(src: str | Path, dst: str | Path, *, explicit: bool = True,
                 write_wavelength: bool = True, images_dtype: str | None = None) -> None:
    """Write the CXI version of the simulated skopi dataset ``src`` to ``dst``.

    Parameters
    ----------
    src, dst : path
        Input (skopi layout, from ``simulate_dataset``) and output CXI file.
    explicit : bool
        Write ``corner_position`` and ``basis_vectors`` (True) or rely on the CXI
        defaults with flipped images (False); see the module docstring.
    write_wavelength : bool
        Also write ``source_1/wavelength`` (m) next to ``source_1/energy`` (J).
    images_dtype : str, optional
        Store the images with this dtype (default: as in ``src``).
    """
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        a = f.attrs
        _, n_panels, h, w = f["intensities"].shape
        assert n_panels == 1 and h == w, "the simulator writes one square panel"
        p = float(a["pixel_size"])
        d = float(a["det_distance"])
        images = f["intensities"][:, 0]
        good = f["mask"][0] != 0
        if not explicit:
            images = images[:, ::-1, ::-1]
            good = good[::-1, ::-1]
        if images_dtype is not None:
            images = images.astype(images_dtype)

        g.create_dataset("cxi_version", data=160)
        entry = g.create_group("entry_1")
        inst = entry.create_group("instrument_1")
        src_g = inst.create_group("source_1")
        src_g.create_dataset("energy", data=float(a["photon_energy_ev"]) * JOULE_PER_EV)
        if write_wavelength:
            src_g.create_dataset("wavelength", data=float(a["wavelength_m"]))
        det = inst.create_group("detector_1")
        det.create_dataset("data", data=np.ascontiguousarray(images), chunks=True)
        det.create_dataset("mask", data=np.where(good, 0, SHADOWED).astype(np.uint32))
        det.create_dataset("distance", data=d)
        det.create_dataset("x_pixel_size", data=p)
        det.create_dataset("y_pixel_size", data=p)
        if explicit:
            det.create_dataset("corner_position", data=[-w * p / 2, -h * p / 2, d])
            det.create_dataset("basis_vectors", data=[[0.0, p, 0.0], [p, 0.0, 0.0]])
        data_1 = entry.create_group("data_1")
        data_1["data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        # Ground truth, in the names the skopi layout uses (extensions to CXI).
        g.create_dataset("orientations", data=f["orientations"][()])
        f.copy(f["ground_truth"], g, "ground_truth")
