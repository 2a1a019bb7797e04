"""Test helpers shared by the test modules (importable as ``from helpers import ...``).

:func:`write_dataset` writes a small, valid dataset in the original SpiniFEL/skopi layout
and returns what it wrote, so tests can compare the reader's output with the truth.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def flat_detector_positions(
    panels: int = 1,
    H: int = 8,
    W: int = 8,
    distance_m: float = 0.2,
    pixel_m: float = 1e-3,
    wavelength_m: float = 1e-10,
) -> np.ndarray:
    """Reciprocal positions of flat square-pixel panels at ``distance_m``, beam along +z.

    Panel ``p`` is shifted along x by ``p * (W + 2)`` pixels so the panels do not overlap.
    ``s = (u - z) / wavelength`` with ``u`` the unit vector to the pixel centre, so
    ``|s| = 2 sin(theta) / lambda`` in inverse metres.

    Returns
    -------
    ndarray, shape (panels, H, W, 3), float64
    """
    rows = (np.arange(H) - (H - 1) / 2) * pixel_m
    cols = (np.arange(W) - (W - 1) / 2) * pixel_m
    out = np.empty((panels, H, W, 3))
    for p in range(panels):
        y, x = np.meshgrid(rows, cols + p * (W + 2) * pixel_m, indexing="ij")
        r = np.stack([x, y, np.full_like(x, distance_m)], axis=-1)
        u = r / np.linalg.norm(r, axis=-1, keepdims=True)
        out[p] = (u - np.array([0.0, 0.0, 1.0])) / wavelength_m
    return out


def write_dataset(
    path: str | Path,
    n_images: int = 8,
    panels: int = 1,
    H: int = 8,
    W: int = 8,
    layout: str = "last",
    with_mask: bool = True,
    with_orientations: bool = True,
    rng: np.random.Generator | int | None = 0,
    *,
    intensity_dtype: str = "float32",
    orientation_shape: str = "n14",
    with_ground_truth: bool = False,
    with_index_map: bool = True,
    mask_fraction: float = 0.1,
) -> dict:
    """Write a small valid dataset in the original layout; return the arrays written.

    Parameters
    ----------
    path : str or Path
        File to create (overwritten).
    n_images, panels, H, W : int
        ``intensities`` has shape (n_images, panels, H, W).
    layout : {"last", "first"}
        ``pixel_position_reciprocal`` as (panels, H, W, 3) (skopi) or (3, panels, H, W).
    with_mask : bool
        Write ``mask`` (uint8, 1 = good) with about ``mask_fraction`` bad pixels (at least
        one good pixel per image is guaranteed to be nonzero).
    with_orientations : bool
        Write random unit quaternions, shape (N, 1, 4) (``orientation_shape="n14"``,
        skopi) or (N, 4) (``"n4"``).
    rng : Generator, int or None
        Random source or seed (default seed 0).
    intensity_dtype : str
        Stored dtype of ``intensities`` (Poisson counts, so integer dtypes work).
    with_ground_truth : bool
        Add an (empty but for one dataset) ``ground_truth`` group.
    with_index_map : bool
        Write ``pixel_index_map`` (panels, H, W, 2) int.

    Returns
    -------
    dict
        ``intensities`` (N, panels, H, W) as stored, ``positions`` (panels, H, W, 3)
        float64, ``mask`` (panels, H, W) bool (all True without a mask), ``orientations``
        (N, 4) float64 or None, ``path``.
    """
    if layout not in ("last", "first"):
        raise ValueError(f"layout must be 'last' or 'first', got {layout!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    pos = flat_detector_positions(panels, H, W)
    mask = np.ones((panels, H, W), dtype=bool)
    if with_mask:
        mask = rng.random((panels, H, W)) >= mask_fraction
        mask.flat[0] = True  # never all masked
    counts = rng.poisson(5.0, size=(n_images, panels, H, W))
    # Guarantee every image has a photon on a good pixel, whatever the seed.
    counts.reshape(n_images, -1)[:, np.flatnonzero(mask.reshape(-1))[0]] += 1
    inten = counts.astype(intensity_dtype)
    quats = None
    with h5py.File(path, "w") as f:
        f.create_dataset("intensities", data=inten)
        f.create_dataset(
            "pixel_position_reciprocal", data=pos if layout == "last" else np.moveaxis(pos, -1, 0)
        )
        if with_index_map:
            rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
            imap = np.stack([rr, cc], axis=-1)[None].repeat(panels, axis=0)
            for p in range(panels):
                imap[p, ..., 1] += p * W
            f.create_dataset("pixel_index_map", data=imap.astype(np.int64))
        if with_mask:
            f.create_dataset("mask", data=mask.astype(np.uint8))
        if with_orientations:
            q = rng.standard_normal((n_images, 4))
            quats = q / np.linalg.norm(q, axis=1, keepdims=True)
            stored = quats[:, None, :] if orientation_shape == "n14" else quats
            f.create_dataset("orientations", data=stored)
        if with_ground_truth:
            g = f.create_group("ground_truth")
            g.create_dataset("note", data=np.arange(3))
        f.attrs["n_images"] = n_images
        f.attrs["det_shape"] = np.array([panels, H, W])
        f.attrs["reciprocal_extent"] = float(np.linalg.norm(pos, axis=-1).max())
    return {
        "path": Path(path),
        "intensities": inten,
        "positions": pos,
        "mask": mask,
        "orientations": quats,
    }


# A tiny reconstruction problem for whole-pipeline tests: 16x16 pixels, M = 25, few
# orientations and phasing iterations (seconds per run).
TINY_ALGORITHM = {"M": 25, "n_orientations": 300, "n_phase_loops": 2, "n_er": 10, "n_hio": 10,
                  "n_final_er": 10, "refine_generations": 1, "lambdas": [1e-2, 1e-1, 1.0],
                  "cg_max_iter": 30}


def simulate_tiny(path: Path, n_images: int) -> Path:
    """Simulate the tiny problem's dataset (300 atoms of the built-in molecule) at ``path``."""
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    simulate_dataset(path, builtin_molecule(seed=0, n_atoms=300), n_images=n_images, n_pixels=16,
                     pixel_size_m=6e-3, M=25, seed=0, beamstop_radius_px=1.0)
    return path


# A small problem that converges from random orientations in about 40 s of CPU (one core):
# 600 noise-free images of 24x24 pixels of 3 mm (8.5 A at the corner) of the built-in
# 2000-atom molecule, M = 29, 2500 orientations, 10 generations with resolution marching
# over 5 and refinement in the last 2. The 300-atom, 16x16 tiny problem never leaves the
# random start (median orientation error 81 deg after 10 generations), this one does.
SMALL_SIM = {"n_images": 600, "n_pixels": 24, "pixel_size_m": 3e-3, "M": 29,
             "beamstop_radius_px": 1.0}
SMALL_ALGORITHM = {"M": 29, "generations": 10, "match_resolution_ramp": 5,
                   "n_orientations": 2500, "n_phase_loops": 2, "n_er": 30, "n_hio": 30, "n_final_er": 30,
                   "cg_max_iter": 60, "refine_generations": 2}


def simulate_small(path: Path) -> Path:
    """Simulate the small converging problem's dataset (:data:`SMALL_SIM`) at ``path``."""
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    simulate_dataset(path, builtin_molecule(seed=0), seed=0, **SMALL_SIM)
    return path


def tiny_config(path: Path, out: Path, algorithm: dict, validation: dict | None = None):
    """The resolved config of a tiny run on ``path`` writing to ``out``."""
    from spinifel.config import load_config

    extra = {"algorithm": dict(algorithm), "data": {"path": str(path)},
             "output": {"dir": str(out)}}
    if validation:
        extra["validation"] = validation
    return load_config(None, (), extra)


def blob_slicer(M: int = 15, n_side: int = 12, eps: float = 1e-9):
    """A model without near-symmetries on a strongly curved detector, for local searches.

    The autocorrelation of 10 Gaussian blobs (seed 11) on an ``M^3`` grid, sliced at
    ``n_side^2`` pixels of a paraboloid ``s_z = 0.6 (s_x^2 + s_y^2)`` (a flat detector cannot
    tell ``q`` from ``q`` turned by pi about the beam). Returns a float64
    :class:`spinifel.orientation.slicing.Slicer`.
    """
    from spinifel.orientation.slicing import Slicer
    from spinifel.phasing.algorithms import autocorrelation_from_density

    idx = np.indices((M, M, M)) - (M - 1) / 2
    x = np.zeros((M, M, M))
    for c in np.random.default_rng(11).uniform(-3.5, 3.5, (10, 3)):
        x += np.exp(-((idx - c[:, None, None, None]) ** 2).sum(0) / 0.8)
    ac = autocorrelation_from_density(x)
    g = np.linspace(-1, 1, n_side)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    s = np.stack([gx.ravel(), gy.ravel(), 0.6 * (gx.ravel() ** 2 + gy.ravel() ** 2)]) * 1e9
    return Slicer(ac, s, np.linalg.norm(s, axis=0).max(), eps=eps, dtype=np.float64)
