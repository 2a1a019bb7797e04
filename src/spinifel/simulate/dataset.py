"""Write a simulated single-particle imaging dataset (the original SpiniFEL/skopi layout).

Image ``i`` is ``|F(R(q_i) s_p)|^2`` (docs/architecture.md: active rotation ``R(q)`` applied
to the detector's reciprocal pixel positions ``s_p``), times a per-image fluence factor,
optionally with Poisson noise. Every random number of image ``i`` (its orientation, its
fluence factor, its photon counts, in that order) comes from
``default_rng(SeedSequence(seed, spawn_key=(i,)))``, and the NUFFT is evaluated so that each
pixel's value does not depend on which other pixels share the call
(:class:`~spinifel.simulate.scatter.StructureFactorPlan` with ``s_bound`` and one thread per
plan). The file is therefore bitwise the same for any number of MPI ranks, threads and any
batch size.

File layout (HDF5):

==============================  ==================  =========  ==================================
dataset                         shape               dtype      meaning
==============================  ==================  =========  ==================================
``intensities``                 (N, 1, n, n)        float32    photons (or ``|F|^2`` noise-free)
``pixel_position_reciprocal``   (1, n, n, 3)        float64    ``s`` in inverse metres
``pixel_index_map``             (1, n, n, 2)        int64      row, column
``orientations``                (N, 4)              float64    ground-truth ``[w, x, y, z]``
``fluences``                    (N,)                float64    true per-image fluence (mean 1)
``mask``                        (1, n, n)           uint8      1 = good, 0 = beamstop or gap
``ground_truth/density``        (M, M, M)           float32    electrons / angstrom^3
``ground_truth/intensity``      (M, M, M)           float32    ``|F|^2``, electrons^2
``ground_truth/atoms_xyz``      (n_atoms, 3)        float64    angstrom, centred
``ground_truth/atoms_element``  (n_atoms,)          S2         element symbols
==============================  ==================  =========  ==================================

Root attributes: ``reciprocal_extent`` (inverse metres), ``n_images``, ``n_pixels_per_image``,
``det_shape``, ``det_distance`` (m), ``pixel_size`` (m), ``photon_energy_ev``,
``wavelength_m``, ``seed``, ``photons_per_image`` (NaN when noise-free), ``noise``
(``"poisson"`` or ``"none"``), ``fluence_jitter`` (relative std of the fluence),
``fluence_sigma`` (std of its logarithm), ``background_photons_per_pixel``,
``beamstop_radius_px``, ``gap_rows``, ``gap_cols``, ``detector`` (preset name or
``"custom"``), ``intensity_scale``, ``nufft_eps``, ``structure_name``, ``generator``. Pixels
behind the beamstop or in a gap (mask 0) are recorded as 0.

Photon scale: ``intensity_scale = photons_per_image / T`` where ``T`` is the mean over 128
quasi-uniform orientations (:func:`~spinifel.geometry.orientations.orientation_grid`) of the
noise-free total ``sum_p mask_p |F(R s_p)|^2``; image ``i`` is then
``Poisson(intensity_scale * fluence_i * |F(R(q_i) s_p)|^2)``, so the expected total photon count
averaged over random orientations is ``photons_per_image`` (to the accuracy of that
128-orientation quadrature, about 1 %). A fixed scale, not a per-image normalisation, keeps
the physical orientation dependence of the total. Noise-free images are
``fluence_i * |F|^2`` and ``intensity_scale`` is 1. The fluence factor is log-normal with
mean 1: ``fluence_i = exp(sigma z_i - sigma^2 / 2)``, ``z_i`` standard normal, given either by
``fluence_sigma`` (``sigma``, the std of ``log fluence``) or by ``fluence_jitter`` (the relative
std ``J``; ``sigma^2 = log(1 + J^2)``); its mean 1 keeps the expected photons per image.

Flat background (Poisson data only): ``background_photons_per_pixel`` ``b`` is added to the
expected counts of every good pixel before the Poisson draw,
``Poisson(intensity_scale * fluence_i * |F|^2 + b)``, independent of the fluence (the
``phi_k W + b`` model of a likelihood score). ``photons_per_image`` counts the particle's
photons only; an image then holds ``b * n_good_pixels`` background photons on average.

Detector gaps: ``gap_rows`` rows (``gap_cols`` columns) through the centre of the detector
(rows ``(n - gap_rows) // 2`` to ``(n + gap_rows) // 2 - 1``) have mask 0 and record 0, like
the beamstop; the photon scale counts good pixels only.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from spinifel import __version__
from spinifel.errors import ConfigError, OutputError
from spinifel.geometry import detector as det
from spinifel.geometry.orientations import (
    orientation_grid,
    quaternion_to_matrix,
    random_quaternions,
)
from spinifel.parallel.collectives import bcast_object, gather_objects
from spinifel.parallel.context import SerialComm
from spinifel.parallel.partition import block_range, block_sizes
from spinifel.simulate.formfactors import form_factor
from spinifel.simulate.presets import DETECTOR_PRESETS  # noqa: F401 (re-exported)
from spinifel.simulate.scatter import StructureFactorPlan
from spinifel.simulate.structure import Structure
from spinifel.simulate.truth import render_ground_truth, voxel_size_angstrom

log = logging.getLogger("spinifel")

N_SCALE_ORIENTATIONS = 128
DEFAULT_BATCH = 128
DEFAULT_EPS = 1e-6



def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of image ``index``: ``SeedSequence(seed, spawn_key=(index,))``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def fluence_log_variance(jitter: float = 0.0, sigma: float = 0.0) -> float:
    """Variance ``sigma^2`` of ``log fluence`` for a relative std ``jitter`` or a log std ``sigma``.

    ``sigma`` wins when positive; else ``sigma^2 = log(1 + jitter^2)`` (0 when both are 0).
    """
    if sigma > 0:
        return float(sigma) * float(sigma)
    return float(np.log1p(jitter * jitter))


def fluence_factor(rng: np.random.Generator, jitter: float, *, sigma: float = 0.0) -> float:
    """One log-normal fluence factor with mean 1 (1 when ``jitter`` and ``sigma`` are 0).

    ``exp(s z - s^2 / 2)`` with ``z`` standard normal and ``s^2`` from
    :func:`fluence_log_variance` (relative std ``jitter`` or log std ``sigma``). One standard
    normal is always drawn so that the photon counts that follow use the same stream
    position whatever the jitter is.
    """
    z = rng.standard_normal()
    sigma2 = fluence_log_variance(jitter, sigma)
    if sigma2 <= 0:
        return 1.0
    return float(np.exp(np.sqrt(sigma2) * z - 0.5 * sigma2))


def gap_mask(n_pixels: int, gap_rows: int = 0, gap_cols: int = 0) -> np.ndarray:
    """Mask of detector gaps through the centre, shape ``(1, n, n)``, uint8 (0 = in a gap).

    ``gap_rows`` rows ``(n - gap_rows) // 2 .. (n + gap_rows) // 2 - 1`` (a horizontal gap)
    and ``gap_cols`` columns likewise (a vertical gap) are 0; 0 means no gap.
    """
    n, r, c = int(n_pixels), int(gap_rows), int(gap_cols)
    if not (0 <= r < n and 0 <= c < n):
        raise ValueError(f"gap widths must be in [0, {n}), got rows={gap_rows}, cols={gap_cols}")
    m = np.ones((1, n, n), dtype=np.uint8)
    m[0, (n - r) // 2:(n - r) // 2 + r, :] = 0
    m[0, :, (n - c) // 2:(n - c) // 2 + c] = 0
    return m


class ImageSimulator:
    """Noise-free and noisy images of one structure on one detector.

    Parameters
    ----------
    structure : Structure
        Atoms in angstrom.
    pixel_position_reciprocal : ndarray, shape (1, n, n, 3)
        Inverse metres.
    mask : ndarray, shape (1, n, n), uint8
        0 behind the beamstop (recorded as 0 photons).
    eps : float
        NUFFT precision.
    workers : int
        Threads; each runs single-threaded NUFFTs on a share of the images.
    """

    def __init__(self, structure: Structure, pixel_position_reciprocal: np.ndarray,
                 mask: np.ndarray, eps: float = DEFAULT_EPS, workers: int = 1) -> None:
        pos = np.asarray(pixel_position_reciprocal, dtype=np.float64)
        self.det_shape = pos.shape[:-1]
        # Inverse metres -> inverse angstrom for the atom coordinates in angstrom.
        self.s = pos.reshape(-1, 3).T * 1e-10
        self.s_norm = np.linalg.norm(self.s, axis=0)
        self.good = np.asarray(mask).reshape(-1).astype(bool)
        self.workers = max(1, int(workers))
        # A rotation keeps |s|, so every component stays within the largest |s| (+ rounding).
        self.plan = StructureFactorPlan(structure, eps=eps, nthreads=1,
                                        s_bound=float(self.s_norm.max()) * (1 + 1e-12) + 1e-300)
        self.ff = np.stack([form_factor(el, self.s_norm) for el in self.plan.elements])

    def noise_free(self, quaternions: np.ndarray) -> np.ndarray:
        """``|F(R(q) s_p)|^2`` with beamstop pixels set to 0.

        Parameters
        ----------
        quaternions : ndarray, shape (b, 4)

        Returns
        -------
        ndarray, shape (b, n_pixels), float64, electrons^2
        """
        q = np.asarray(quaternions, dtype=np.float64).reshape(-1, 4)
        if q.shape[0] == 0:
            return np.zeros((0, self.s.shape[1]))
        parts = np.array_split(np.arange(q.shape[0]), min(self.workers, q.shape[0]))
        if len(parts) == 1:
            return self._noise_free_serial(q)
        # finufft's ctypes calls release the GIL: threads run the NUFFTs concurrently.
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            out = list(pool.map(lambda idx: self._noise_free_serial(q[idx]), parts))
        return np.concatenate(out, axis=0)

    def _noise_free_serial(self, q: np.ndarray) -> np.ndarray:
        rot = quaternion_to_matrix(q)  # (b, 3, 3)
        s_rot = np.einsum("bij,jp->ibp", rot, self.s).reshape(3, -1)
        g = self.plan.element_sums(s_rot).reshape(len(self.plan.elements), q.shape[0], -1)
        f = np.einsum("ep,ebp->bp", self.ff, g)
        img = f.real ** 2 + f.imag ** 2
        img[:, ~self.good] = 0.0
        return img

    def images(self, start: int, stop: int, *, seed: int, scale: float | None,
               fluence_jitter: float = 0.0, fluence_sigma: float = 0.0,
               background: float = 0.0,
               orientations: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
        """Images ``start .. stop-1`` of the dataset.

        Parameters
        ----------
        start, stop : int
            Global image indices.
        seed : int
            Dataset seed; image ``i`` draws from :func:`image_rng` ``(seed, i)``.
        scale : float or None
            Photons per unit ``|F|^2`` (``intensity_scale``); ``None`` for noise-free images.
        fluence_jitter, fluence_sigma : float
            Relative std, or std of the logarithm, of the per-image fluence factor
            (:func:`fluence_factor`).
        background : float
            Photons per good pixel added to the expected counts before the Poisson draw
            (ignored for noise-free images, ``scale=None``).
        orientations : ndarray, shape (N, 4), optional
            Fixed orientations for the whole dataset (indexed by global image index)
            instead of random ones; the random orientation is still drawn and discarded so
            the noise does not depend on this choice.

        Returns
        -------
        images : ndarray, shape (stop - start, n_pixels), float32
        quaternions : ndarray, shape (stop - start, 4), float64
        fluences : ndarray, shape (stop - start,), float64
        """
        n = stop - start
        rngs = [image_rng(seed, i) for i in range(start, stop)]
        q = np.empty((n, 4))
        fl = np.empty(n)
        for k, rng in enumerate(rngs):
            q[k] = random_quaternions(1, rng)[0]
            fl[k] = fluence_factor(rng, fluence_jitter, sigma=fluence_sigma)
        if orientations is not None:
            q = np.asarray(orientations[start:stop], dtype=np.float64)
        lam = self.noise_free(q) * fl[:, None]
        if scale is None:
            return lam.astype(np.float32), q, fl
        lam *= scale
        if background > 0:
            lam[:, self.good] += background
        out = np.empty(lam.shape, dtype=np.float32)
        for k, rng in enumerate(rngs):
            out[k] = rng.poisson(lam[k])
        return out, q, fl


def _everywhere(err: Exception) -> Exception:
    """Mark an error raised identically on every rank (the CLI then exits cleanly on all)."""
    err.collective = True
    return err


def _check_params(n_images: int, n_pixels: int, photons_per_image: float | None,
                  noise: dict, beamstop_radius_px: float, M: int, batch: int,
                  orientations: np.ndarray | None, structure: Structure) -> None:
    if int(n_images) < 1:
        raise ConfigError(f"simulate: n_images must be >= 1, got {n_images}")
    if int(n_pixels) < 2:
        raise ConfigError(f"simulate: n_pixels must be >= 2, got {n_pixels}")
    if photons_per_image is not None and not (np.isfinite(photons_per_image)
                                              and photons_per_image > 0):
        raise ConfigError(f"simulate: photons_per_image must be > 0 or None (noise-free), "
                          f"got {photons_per_image!r}")
    for key in ("fluence_jitter", "fluence_sigma", "background_photons_per_pixel"):
        if not (np.isfinite(noise[key]) and noise[key] >= 0):
            raise ConfigError(f"simulate: {key} must be >= 0, got {noise[key]!r}")
    if noise["fluence_jitter"] > 0 and noise["fluence_sigma"] > 0:
        raise ConfigError("simulate: give fluence_jitter (relative std) or fluence_sigma "
                          "(std of log fluence), not both")
    if noise["background_photons_per_pixel"] > 0 and photons_per_image is None:
        raise ConfigError("simulate: background_photons_per_pixel needs photons_per_image "
                          "(a background is in photons; noise-free images are |F|^2)")
    for key in ("gap_rows", "gap_cols"):
        if not 0 <= int(noise[key]) < int(n_pixels):
            raise ConfigError(f"simulate: {key} must be in [0, {n_pixels}), got {noise[key]}")
    if not (np.isfinite(beamstop_radius_px) and 0 <= beamstop_radius_px < n_pixels / 2):
        raise ConfigError(f"simulate: beamstop_radius_px must be in [0, {n_pixels / 2}), "
                          f"got {beamstop_radius_px!r}")
    if int(M) < 3 or int(M) % 2 == 0:
        raise ConfigError(f"simulate: M must be odd and >= 3, got {M}")
    if int(batch) < 1:
        raise ConfigError(f"simulate: batch must be >= 1, got {batch}")
    if orientations is not None and np.shape(orientations) != (int(n_images), 4):
        raise ConfigError(f"simulate: orientations must have shape ({n_images}, 4), "
                          f"got {np.shape(orientations)}")
    if structure.n_atoms == 0:
        raise ConfigError(f"simulate: structure {structure.name!r} has no atoms")


def simulate_dataset(path: str | os.PathLike, structure: Structure, *, n_images: int,
                     n_pixels: int = det.DEFAULT_N_PIXELS,
                     pixel_size_m: float = det.DEFAULT_PIXEL_SIZE_M,
                     distance_m: float = det.DEFAULT_DISTANCE_M,
                     photon_energy_ev: float = det.DEFAULT_PHOTON_ENERGY_EV,
                     photons_per_image: float | None = None, fluence_jitter: float = 0.0,
                     fluence_sigma: float = 0.0, background_photons_per_pixel: float = 0.0,
                     beamstop_radius_px: float = 0.0, gap_rows: int = 0, gap_cols: int = 0,
                     M: int = 41, seed: int = 0, comm: Any = None,
                     batch: int = DEFAULT_BATCH, workers: int = 1, eps: float = DEFAULT_EPS,
                     orientations: np.ndarray | None = None,
                     detector_name: str = "custom") -> dict:
    """Simulate ``n_images`` diffraction patterns of ``structure`` and write them to ``path``.

    Every rank simulates its contiguous block of images
    (:func:`~spinifel.parallel.partition.block_range`) ``batch`` images at a time; the
    batches are gathered to rank 0, which alone writes the file (no parallel HDF5 needed).
    Rank 0 writes to ``path + ".partial"`` and renames it to ``path`` only when complete (an
    existing ``path`` is replaced), so an interrupted run never leaves a truncated file
    under the final name. Memory per rank is ``O(batch * n_pixels^2)`` (rank 0: times the
    number of ranks).

    Parameters
    ----------
    path : path-like
        Output HDF5 file.
    structure : Structure
        Atoms in angstrom, centred.
    n_images : int
        Number of images ``N``.
    n_pixels, pixel_size_m, distance_m, photon_energy_ev : int, float, float, float
        Square flat detector (see :mod:`spinifel.geometry.detector` for the defaults).
    photons_per_image : float or None
        Mean total photons per image (Poisson noise), or ``None`` for noise-free ``|F|^2``.
    fluence_jitter : float
        Relative std of the per-image (log-normal, mean 1) fluence factor.
    fluence_sigma : float
        Instead of ``fluence_jitter``: the std of ``log fluence`` (mean still 1); giving both
        is an error.
    background_photons_per_pixel : float
        Flat background, photons per good pixel added to the expected counts before the
        Poisson draw (needs ``photons_per_image``).
    beamstop_radius_px : float
        Radius in pixels of the central beamstop (mask 0, intensities 0).
    gap_rows, gap_cols : int
        Widths in pixels of a horizontal and a vertical gap through the centre (mask 0,
        intensities 0; :func:`gap_mask`).
    M : int
        Odd size of the ground-truth grid.
    seed : int
        Seeds every random choice; the file is a deterministic function of the arguments.
    comm : mpi4py communicator or None
        Anything with ``Get_rank``, ``Get_size``, ``gather`` and ``bcast``; ``None``: serial.
        All ranks must call with the same arguments.
    batch : int
        Images per rank per step.
    workers : int
        Threads per rank for the NUFFTs (results do not depend on it).
    eps : float
        NUFFT precision.
    orientations : ndarray, shape (N, 4), optional
        Use these orientations instead of random ones.
    detector_name : str
        Recorded as the ``detector`` attribute (the ``simulate --detector`` preset).

    Returns
    -------
    dict
        Summary (the same on every rank): ``path``, ``n_images``, ``det_shape``,
        ``n_ranks``, ``seconds``, ``images_per_second``, ``resolution_edge_angstrom``,
        ``resolution_corner_angstrom``, ``reciprocal_extent``, ``voxel_size_angstrom``, ``M``,
        ``wavelength_m``, ``photons_per_image``, ``mean_photons`` (mean recorded total per
        image, background included), ``background_photons`` (its expected background
        part), ``n_good_pixels``, ``intensity_scale``, ``structure_name``, ``n_atoms``.

    Raises
    ------
    ConfigError
        For invalid parameters (raised on every rank before any collective).
    OutputError
        If the output directory does not exist (checked on every rank).
    """
    t0 = time.perf_counter()
    comm = SerialComm() if comm is None else comm
    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    noise = {"fluence_jitter": fluence_jitter, "fluence_sigma": fluence_sigma,
             "background_photons_per_pixel": background_photons_per_pixel,
             "gap_rows": gap_rows, "gap_cols": gap_cols}
    path = _check_everywhere(path, n_images, n_pixels, photons_per_image, noise,
                             beamstop_radius_px, M, batch, orientations, structure)
    n_images, n_pixels, M = int(n_images), int(n_pixels), int(M)

    wavelength = det.photon_energy_to_wavelength(photon_energy_ev)
    pos = det.flat_detector_positions(n_pixels, pixel_size_m, distance_m, wavelength)
    mask = det.beamstop_mask(n_pixels, beamstop_radius_px) & gap_mask(n_pixels, gap_rows,
                                                                      gap_cols)
    reciprocal_extent = float(np.linalg.norm(pos, axis=-1).max())
    sim = ImageSimulator(structure, pos, mask, eps=eps, workers=workers)
    # Relative std and log std of the fluence, whichever was given (both recorded).
    sigma2 = fluence_log_variance(fluence_jitter, fluence_sigma)
    background = float(background_photons_per_pixel)

    scale = _photon_scale(sim, photons_per_image)

    attrs = _file_attrs(locals(), pos=pos, wavelength=wavelength, sigma2=sigma2,
                        scale=scale, reciprocal_extent=reciprocal_extent)
    totals = _write_images(comm, path, sim, structure, attrs=attrs, pos=pos, mask=mask, M=M,
                           batch=int(batch), seed=seed, scale=scale,
                           kw={"fluence_jitter": fluence_jitter,
                               "fluence_sigma": fluence_sigma, "background": background,
                               "orientations": orientations})
    summary = None
    if rank == 0:
        summary = _summary(path, structure, pos, mask, n_images=n_images, n_ranks=size,
                           t0=t0, reciprocal_extent=reciprocal_extent, M=M,
                           wavelength=wavelength, photons_per_image=photons_per_image,
                           totals=totals, scale=scale, background=background)
    return bcast_object(comm, summary)


def _check_everywhere(path: str | os.PathLike, *params: Any) -> Path:
    """:func:`_check_params` and the output directory, raised on every rank; ``Path(path)``."""
    try:
        _check_params(*params)
    except ConfigError as exc:
        raise _everywhere(exc) from None
    path = Path(path)
    if not path.parent.is_dir():
        raise _everywhere(OutputError(f"{path}: output directory {path.parent} does not exist"))
    return path


def _photon_scale(sim: Any, photons_per_image: float | None) -> float | None:
    """Intensity factor giving ``photons_per_image`` on average (None: noise-free).

    From a fixed orientation quadrature, so identical on every rank.
    """
    if photons_per_image is None:
        return None
    ref = sim.noise_free(orientation_grid(N_SCALE_ORIENTATIONS)).sum(axis=1).mean()
    if not ref > 0:
        raise _everywhere(ConfigError("simulate: the noise-free images are all zero "
                                      "(every pixel masked?)"))
    return float(photons_per_image) / float(ref)


def _file_attrs(p: dict, *, pos: np.ndarray, wavelength: float, sigma2: float,
                scale: float | None, reciprocal_extent: float) -> dict:
    """Root attributes of the dataset file from :func:`simulate_dataset`'s arguments ``p``."""
    return {
        "reciprocal_extent": reciprocal_extent,
        "n_images": p["n_images"],
        "n_pixels_per_image": int(np.prod(pos.shape[:-1])),
        "det_shape": np.array(pos.shape[:-1], dtype=np.int64),
        "det_distance": float(p["distance_m"]),
        "pixel_size": float(p["pixel_size_m"]),
        "photon_energy_ev": float(p["photon_energy_ev"]),
        "wavelength_m": float(wavelength),
        "seed": int(p["seed"]),
        "photons_per_image": (np.nan if p["photons_per_image"] is None
                              else float(p["photons_per_image"])),
        "noise": "none" if p["photons_per_image"] is None else "poisson",
        "fluence_jitter": float(np.sqrt(np.expm1(sigma2))),
        "fluence_sigma": float(np.sqrt(sigma2)),
        "background_photons_per_pixel": float(p["background_photons_per_pixel"]),
        "beamstop_radius_px": float(p["beamstop_radius_px"]),
        "gap_rows": int(p["gap_rows"]),
        "gap_cols": int(p["gap_cols"]),
        "detector": str(p["detector_name"]),
        "intensity_scale": 1.0 if scale is None else scale,
        "nufft_eps": float(p["eps"]),
        "structure_name": p["structure"].name,
        "generator": f"spinifel-mpi {__version__} simulate",
    }


def _summary(path: Path, structure: Structure, pos: np.ndarray, mask: np.ndarray, *,
             n_images: int, n_ranks: int, t0: float, reciprocal_extent: float, M: int,
             wavelength: float, photons_per_image: float | None, totals: list,
             scale: float | None, background: float) -> dict:
    """The summary :func:`simulate_dataset` returns (built on rank 0)."""
    seconds = time.perf_counter() - t0
    edge, corner = det.resolution_angstrom(pos)
    n_good = int(mask.sum())
    return {
        "path": str(path),
        "n_images": n_images,
        "det_shape": tuple(int(x) for x in pos.shape[:-1]),
        "n_ranks": n_ranks,
        "seconds": seconds,
        "images_per_second": n_images / seconds if seconds > 0 else float("inf"),
        "resolution_edge_angstrom": edge,
        "resolution_corner_angstrom": corner,
        "reciprocal_extent": reciprocal_extent,
        "voxel_size_angstrom": voxel_size_angstrom(reciprocal_extent),
        "M": M,
        "wavelength_m": wavelength,
        "photons_per_image": photons_per_image,
        "mean_photons": float(np.concatenate(totals).mean()),
        "background_photons": background * n_good if scale is not None else 0.0,
        "n_good_pixels": n_good,
        "intensity_scale": 1.0 if scale is None else scale,
        "structure_name": structure.name,
        "n_atoms": structure.n_atoms,
    }


def _write_images(comm: Any, path: Path, sim: ImageSimulator, structure: Structure, *,
                  attrs: dict, pos: np.ndarray, mask: np.ndarray, M: int, batch: int,
                  seed: int, scale: float | None, kw: dict) -> list[np.ndarray]:
    """Simulate every rank's images and write the file atomically (rank 0 writes).

    Returns the per-image recorded totals on rank 0 (an empty list elsewhere).
    """
    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    n_images = int(attrs["n_images"])
    tmp = path.with_name(path.name + ".partial")
    start, stop = block_range(n_images, size, rank)
    n_steps = -(-max(block_sizes(n_images, size)) // batch)
    h5 = None
    totals: list[np.ndarray] = []
    try:
        failure = None
        if rank == 0:
            try:
                h5 = _create_file(tmp, structure, attrs=attrs, pos=pos, mask=mask, M=M)
            except OutputError as exc:
                failure = str(exc)
        # Tell every rank whether the file could be created, so none waits in vain.
        failure = bcast_object(comm, failure)
        if failure is not None:
            raise _everywhere(OutputError(failure))
        for step in range(n_steps):
            a = min(start + step * batch, stop)
            b = min(a + batch, stop)
            result = (a, *sim.images(a, b, seed=seed, scale=scale, **kw))
            gathered = gather_objects(comm, result)
            if rank == 0:
                for a_r, img, q, fl in gathered:
                    b_r = a_r + img.shape[0]
                    if b_r > a_r:
                        h5["intensities"][a_r:b_r] = img.reshape((-1,) + pos.shape[:-1])
                        h5["orientations"][a_r:b_r] = q
                        h5["fluences"][a_r:b_r] = fl
                        totals.append(img.sum(axis=1, dtype=np.float64))
        if rank == 0:
            h5.close()
            h5 = None
            os.replace(tmp, path)
    except BaseException:
        if h5 is not None:
            h5.close()
        if rank == 0 and tmp.exists():
            tmp.unlink()
        raise
    return totals


def _create_file(tmp: Path, structure: Structure, *, attrs: dict, pos: np.ndarray,
                 mask: np.ndarray, M: int):
    """Create the ``.partial`` file with everything except the image rows (rank 0 only)."""
    import h5py

    try:
        h5 = h5py.File(tmp, "w")
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot create the dataset file: {exc}") from exc
    try:
        _fill_file(h5, structure, attrs=attrs, pos=pos, mask=mask, M=M)
    except BaseException:
        h5.close()
        raise
    return h5


def _fill_file(h5, structure: Structure, *, attrs: dict, pos: np.ndarray, mask: np.ndarray,
               M: int) -> None:
    """Write every dataset and attribute except the image rows."""
    det_shape = pos.shape[:-1]
    n_images = int(attrs["n_images"])
    reciprocal_extent = float(attrs["reciprocal_extent"])
    h5.create_dataset("intensities", shape=(n_images,) + det_shape, dtype=np.float32)
    h5.create_dataset("orientations", shape=(n_images, 4), dtype=np.float64)
    h5.create_dataset("fluences", shape=(n_images,), dtype=np.float64)
    h5.create_dataset("pixel_position_reciprocal", data=pos)
    h5.create_dataset("pixel_index_map", data=det.pixel_index_map(det_shape[-1]))
    h5.create_dataset("mask", data=mask.astype(np.uint8))
    for k, v in attrs.items():
        h5.attrs[k] = v
    density, intensity = render_ground_truth(structure, M, reciprocal_extent)
    gt = h5.create_group("ground_truth")
    gt.create_dataset("density", data=density)
    gt.create_dataset("intensity", data=intensity)
    gt.create_dataset("atoms_xyz", data=structure.xyz)
    gt.create_dataset("atoms_element", data=np.array(structure.elements, dtype="S2"))
    gt.attrs["voxel_size_angstrom"] = voxel_size_angstrom(reciprocal_extent)
    gt.attrs["M"] = int(M)
    gt.attrs["structure_name"] = structure.name
    gt.attrs["reciprocal_extent"] = reciprocal_extent
    gt.attrs["density_units"] = "electrons per cubic angstrom (band-limited to the grid)"
    gt.attrs["intensity_units"] = "electrons^2 (|F|^2); times intensity_scale = photons"
