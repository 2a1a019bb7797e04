"""Detector geometry: reciprocal-space positions of the pixels of a flat detector.

Conventions (docs/architecture.md): the beam travels along ``+z``; a pixel at
laboratory position ``p`` (metres, sample at the origin) scatters along the unit vector
``u = p / |p|``; its reciprocal position is ``s = (u - e_z) / lambda`` in **inverse
metres**, so that ``|s| = 2 sin(theta) / lambda`` with ``2 theta`` the scattering angle
(no factor ``2 pi``). Pixel centres are symmetric about the beam: the pixel of row ``i``
and column ``j`` of an ``n x n`` detector sits at ``x = (j - (n - 1) / 2) * pixel_size``,
``y = (i - (n - 1) / 2) * pixel_size``, ``z = distance``.

Default geometry (:data:`DEFAULT_PIXEL_SIZE_M`, :data:`DEFAULT_DISTANCE_M`,
:data:`DEFAULT_PHOTON_ENERGY_EV`): 64 x 64 pixels of 1.5 mm at 0.2 m with 6 keV photons
(lambda = 2.066 angstrom) reach 8.9 angstrom at the middle of the edge and 6.4 angstrom at
the corners, the right scale for a 50-70 angstrom protein such as 2CEX; 128 x 128 pixels of
the same size reach 4.7 angstrom (edge) and 3.5 angstrom (corner).
"""

from __future__ import annotations

import numpy as np

# CODATA 2018 exact values: h c = 1.239841984e-6 eV m.
PLANCK_EV_S = 4.135667696e-15
SPEED_OF_LIGHT_M_S = 299792458.0
HC_EV_M = PLANCK_EV_S * SPEED_OF_LIGHT_M_S

DEFAULT_N_PIXELS = 64
DEFAULT_PIXEL_SIZE_M = 1.5e-3
DEFAULT_DISTANCE_M = 0.2
DEFAULT_PHOTON_ENERGY_EV = 6000.0


def photon_energy_to_wavelength(energy_ev: float) -> float:
    """Wavelength in metres of a photon of ``energy_ev`` electronvolts (``lambda = h c / E``).

    Raises
    ------
    ValueError
        If the energy is not a finite positive number.
    """
    e = float(energy_ev)
    if not np.isfinite(e) or e <= 0:
        raise ValueError(f"photon energy must be a positive number of eV, got {energy_ev!r}")
    return HC_EV_M / e


def flat_detector_positions(n_pixels: int, pixel_size_m: float, distance_m: float,
                            wavelength_m: float) -> np.ndarray:
    """Reciprocal positions of the pixel centres of a square flat detector.

    Parameters
    ----------
    n_pixels : int
        Pixels along each side (the detector is ``n_pixels x n_pixels``), >= 1.
    pixel_size_m : float
        Pixel pitch in metres, > 0.
    distance_m : float
        Sample-to-detector distance along the beam in metres, > 0.
    wavelength_m : float
        X-ray wavelength in metres, > 0.

    Returns
    -------
    ndarray, shape (1, n_pixels, n_pixels, 3), float64
        ``s`` in inverse metres for panel 0, row ``i``, column ``j``; the last axis is
        ``(s_x, s_y, s_z)``. The skopi/SpiniFEL ``pixel_position_reciprocal`` layout.
    """
    n = int(n_pixels)
    if n < 1:
        raise ValueError(f"n_pixels must be >= 1, got {n_pixels}")
    for name, value in (("pixel_size_m", pixel_size_m), ("distance_m", distance_m),
                        ("wavelength_m", wavelength_m)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    c = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * pixel_size_m
    y, x = np.meshgrid(c, c, indexing="ij")
    z = np.full_like(x, float(distance_m))
    norm = np.sqrt(x * x + y * y + z * z)
    s = np.stack([x / norm, y / norm, z / norm - 1.0], axis=-1) / wavelength_m
    return s[np.newaxis]


def pixel_index_map(n_pixels: int) -> np.ndarray:
    """Row/column of every pixel, shape ``(1, n_pixels, n_pixels, 2)``, int64 (display only)."""
    i, j = np.meshgrid(np.arange(n_pixels), np.arange(n_pixels), indexing="ij")
    return np.stack([i, j], axis=-1)[np.newaxis].astype(np.int64)


def beamstop_mask(n_pixels: int, radius_px: float) -> np.ndarray:
    """Mask of a circular beamstop centred on the beam, shape ``(1, n, n)``, uint8.

    A pixel is 0 (blocked) when its centre lies strictly within ``radius_px`` pixel pitches
    of the beam axis, 1 otherwise; ``radius_px = 0`` blocks nothing.
    """
    if not np.isfinite(radius_px) or radius_px < 0:
        raise ValueError(f"beamstop radius must be >= 0 pixels, got {radius_px!r}")
    c = np.arange(n_pixels, dtype=np.float64) - (n_pixels - 1) / 2.0
    r = np.hypot(c[:, None], c[None, :])
    return (r >= radius_px).astype(np.uint8)[np.newaxis]


def resolution_angstrom(pixel_position_reciprocal: np.ndarray) -> tuple[float, float]:
    """Resolution ``1/|s|`` in angstrom at the middle of the edge and at the corner.

    Parameters
    ----------
    pixel_position_reciprocal : ndarray, shape (1, n, n, 3)
        Inverse metres, as returned by :func:`flat_detector_positions`.

    Returns
    -------
    (edge, corner) : tuple of float
        ``edge`` is the resolution at the outermost pixel along a detector axis through the
        centre (the best resolution available over a full ring), ``corner`` at the corner.
    """
    s = np.linalg.norm(np.asarray(pixel_position_reciprocal)[0], axis=-1)
    n = s.shape[0]
    edge = s[n // 2, :].max()
    corner = s.max()
    return 1e10 / float(edge), 1e10 / float(corner)


def reciprocal_from_lab(points_m: np.ndarray, wavelength_m: float) -> np.ndarray:
    """Reciprocal positions ``s = (u - e_z) / lambda`` of pixels at laboratory positions.

    The beam runs along ``+z`` and the sample sits at the origin (the CXI and NeXus
    convention); ``u = p / |p|`` is the direction from the sample to the pixel centre ``p``.
    ``s_z`` is evaluated as ``-(x^2 + y^2) / (|p| (|p| + z)) / lambda``, which equals
    ``(z / |p| - 1) / lambda`` without its cancellation near the beam, so every component is
    accurate to a few ulp relative to ``|s|``.

    Parameters
    ----------
    points_m : ndarray, shape (..., 3)
        Pixel centres ``(x, y, z)`` in metres, all with ``z > 0`` (downstream of the sample).
    wavelength_m : float
        X-ray wavelength in metres, > 0.

    Returns
    -------
    ndarray, shape (..., 3), float64
        ``s`` in inverse metres, ``|s| = 2 sin(theta) / lambda``.

    Raises
    ------
    ValueError
        If a point has ``z <= 0`` or is not finite, or the wavelength is not positive.
    """
    p = np.asarray(points_m, dtype=np.float64)
    if not np.isfinite(wavelength_m) or wavelength_m <= 0:
        raise ValueError(f"wavelength_m must be a positive number, got {wavelength_m!r}")
    if p.shape[-1:] != (3,):
        raise ValueError(f"points_m must have a last axis of length 3, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("points_m must be finite")
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if not (z > 0).all():
        raise ValueError("every pixel must lie downstream of the sample (z > 0)")
    rho2 = x * x + y * y
    norm = np.sqrt(rho2 + z * z)
    s = np.stack([x / norm, y / norm, -rho2 / (norm * (norm + z))], axis=-1)
    return s / float(wavelength_m)
