"""Named detector geometries of ``spinifel-mpi simulate --detector`` (light: no NUFFT import)."""

from __future__ import annotations

from spinifel.geometry import detector as det

# Named geometries for ``simulate --detector``: pixels per side, pixel pitch (m), distance (m),
# photon energy (eV), beamstop radius (pixels). "photon-limited" is the geometry of the
# photon-limited benchmark of issue 13 (64 x 64 pixels of 2 mm at 0.2 m, 4.6 keV: 6.5 angstrom
# at the corner, beamstop radius 3 pixels).
DETECTOR_PRESETS: dict[str, dict[str, float]] = {
    "default": {"n_pixels": det.DEFAULT_N_PIXELS, "pixel_size_m": det.DEFAULT_PIXEL_SIZE_M,
                "distance_m": det.DEFAULT_DISTANCE_M,
                "photon_energy_ev": det.DEFAULT_PHOTON_ENERGY_EV, "beamstop_radius_px": 0.0},
    "photon-limited": {"n_pixels": 64, "pixel_size_m": 2e-3, "distance_m": 0.2,
                       "photon_energy_ev": 4600.0, "beamstop_radius_px": 3.0},
}
