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
``fluences``                    (N,)                float64    per-image fluence factor (mean 1)
``mask``                        (1, n, n)           uint8      1 = good pixel, 0 = beamstop
``ground_truth/density``        (M, M, M)           float32    electrons / angstrom^3
``ground_truth/intensity``      (M, M, M)           float32    ``|F|^2``, electrons^2
``ground_truth/atoms_xyz``      (n_atoms, 3)        float64    angstrom, centred
``ground_truth/atoms_element``  (n_atoms,)          S2         element symbols
==============================  ==================  =========  ==================================

Root attributes: ``reciprocal_extent`` (inverse metres), ``n_images``, ``n_pixels_per_image``,
``det_shape``, ``det_distance`` (m), ``pixel_size`` (m), ``photon_energy_ev``,
``wavelength_m``, ``seed``, ``photons_per_image`` (NaN when noise-free), ``noise``
(``"poisson"`` or ``"none"``), ``fluence_jitter``, ``beamstop_radius_px``, ``intensity_scale``,
``nufft_eps``, ``structure_name``, ``generator``. Pixels behind the beamstop are recorded as 0.

Photon scale: ``intensity_scale = photons_per_image / T`` where ``T`` is the mean over 128
quasi-uniform orientations (:func:`~spinifel.geometry.orientations.orientation_grid`) of the
noise-free total ``sum_p mask_p |F(R s_p)|^2``; image ``i`` is then
``Poisson(intensity_scale * fluence_i * |F(R(q_i) s_p)|^2)``, so the expected total photon count
averaged over random orientations is ``photons_per_image`` (to the accuracy of that
128-orientation quadrature, about 1 %). A fixed scale, not a per-image normalisation, keeps
the physical orientation dependence of the total. Noise-free images are
``fluence_i * |F|^2`` and ``intensity_scale`` is 1. The fluence factor is log-normal with
mean 1 and relative standard deviation ``fluence_jitter``.
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


def fluence_factor(rng: np.random.Generator, jitter: float) -> float:
    """One log-normal fluence factor with mean 1 and relative std ``jitter`` (1 if 0).

    One standard normal is always drawn so that the photon counts that follow use the same
    stream position whatever ``jitter`` is.
    """
    z = rng.standard_normal()
    if jitter <= 0:
        return 1.0
    sigma2 = np.log1p(jitter * jitter)
    return float(np.exp(np.sqrt(sigma2) * z - 0.5 * sigma2))


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
               fluence_jitter: float = 0.0,
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
        fluence_jitter : float
            Relative std of the per-image fluence factor.
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
            fl[k] = fluence_factor(rng, fluence_jitter)
        if orientations is not None:
            q = np.asarray(orientations[start:stop], dtype=np.float64)
        lam = self.noise_free(q) * fl[:, None]
        if scale is None:
            return lam.astype(np.float32), q, fl
        lam *= scale
        out = np.empty(lam.shape, dtype=np.float32)
        for k, rng in enumerate(rngs):
            out[k] = rng.poisson(lam[k])
        return out, q, fl


def _everywhere(err: Exception) -> Exception:
    """Mark an error raised identically on every rank (the CLI then exits cleanly on all)."""
    err.collective = True
    return err


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


def _check_params(n_images: int, n_pixels: int, photons_per_image: float | None,
                  fluence_jitter: float, beamstop_radius_px: float, M: int, batch: int,
                  orientations: np.ndarray | None, structure: Structure) -> None:
    if int(n_images) < 1:
        raise ConfigError(f"simulate: n_images must be >= 1, got {n_images}")
    if int(n_pixels) < 2:
        raise ConfigError(f"simulate: n_pixels must be >= 2, got {n_pixels}")
    if photons_per_image is not None and not (np.isfinite(photons_per_image)
                                              and photons_per_image > 0):
        raise ConfigError(f"simulate: photons_per_image must be > 0 or None (noise-free), "
                          f"got {photons_per_image!r}")
    if not (np.isfinite(fluence_jitter) and fluence_jitter >= 0):
        raise ConfigError(f"simulate: fluence_jitter must be >= 0, got {fluence_jitter!r}")
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
                     beamstop_radius_px: float = 0.0, M: int = 41, seed: int = 0,
                     comm: Any = None, batch: int = DEFAULT_BATCH, workers: int = 1,
                     eps: float = DEFAULT_EPS,
                     orientations: np.ndarray | None = None) -> dict:
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
    beamstop_radius_px : float
        Radius in pixels of the central beamstop (mask 0, intensities 0).
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

    Returns
    -------
    dict
        Summary (the same on every rank): ``path``, ``n_images``, ``det_shape``,
        ``n_ranks``, ``seconds``, ``images_per_second``, ``resolution_edge_angstrom``,
        ``resolution_corner_angstrom``, ``reciprocal_extent``, ``voxel_size_angstrom``, ``M``,
        ``wavelength_m``, ``photons_per_image``, ``mean_photons`` (mean recorded total per
        image), ``intensity_scale``, ``structure_name``, ``n_atoms``.

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
    path = _check_everywhere(path, n_images, n_pixels, photons_per_image, fluence_jitter,
                             beamstop_radius_px, M, batch, orientations, structure)
    n_images, n_pixels, M = int(n_images), int(n_pixels), int(M)

    wavelength = det.photon_energy_to_wavelength(photon_energy_ev)
    pos = det.flat_detector_positions(n_pixels, pixel_size_m, distance_m, wavelength)
    mask = det.beamstop_mask(n_pixels, beamstop_radius_px)
    reciprocal_extent = float(np.linalg.norm(pos, axis=-1).max())
    sim = ImageSimulator(structure, pos, mask, eps=eps, workers=workers)

    scale = _photon_scale(sim, photons_per_image)

    tmp = path.with_name(path.name + ".partial")
    start, stop = block_range(n_images, size, rank)
    n_steps = -(-max(block_sizes(n_images, size)) // int(batch))
    h5, totals = None, []
    try:
        h5 = _create_everywhere(
            comm, tmp, structure, n_images=n_images, pos=pos, mask=mask, M=M,
            reciprocal_extent=reciprocal_extent, seed=seed, pixel_size_m=pixel_size_m,
            distance_m=distance_m, photon_energy_ev=photon_energy_ev, wavelength=wavelength,
            photons_per_image=photons_per_image, fluence_jitter=fluence_jitter,
            beamstop_radius_px=beamstop_radius_px, scale=1.0 if scale is None else scale,
            eps=eps)
        for step in range(n_steps):
            a = min(start + step * int(batch), stop)
            b = min(a + int(batch), stop)
            result = (a, *sim.images(a, b, seed=seed, scale=scale,
                                     fluence_jitter=fluence_jitter,
                                     orientations=orientations))
            _write_gathered(h5, gather_objects(comm, result), pos.shape[:-1], totals)
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

    summary = None
    if rank == 0:
        summary = _summary(path, structure, pos, n_images=n_images, n_ranks=size, t0=t0,
                           reciprocal_extent=reciprocal_extent, M=M, wavelength=wavelength,
                           photons_per_image=photons_per_image, totals=totals, scale=scale)
    return bcast_object(comm, summary)


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


def _write_gathered(h5: Any, gathered: list | None, det_shape: tuple, totals: list) -> None:
    """Rank 0: write every rank's ``(start, images, orientations, fluences)`` batch into
    the open file ``h5``; append each image's total to ``totals``. No-op elsewhere
    (``gathered`` is None)."""
    if gathered is None:
        return
    for a_r, img, q, fl in gathered:
        b_r = a_r + img.shape[0]
        if b_r > a_r:
            h5["intensities"][a_r:b_r] = img.reshape((-1,) + tuple(det_shape))
            h5["orientations"][a_r:b_r] = q
            h5["fluences"][a_r:b_r] = fl
            totals.append(img.sum(axis=1, dtype=np.float64))


def _summary(path: Path, structure: Structure, pos: np.ndarray, *, n_images: int,
             n_ranks: int, t0: float, reciprocal_extent: float, M: int, wavelength: float,
             photons_per_image: float | None, totals: list, scale: float | None) -> dict:
    """The summary :func:`simulate_dataset` returns (built on rank 0)."""
    size = n_ranks
    seconds = time.perf_counter() - t0
    edge, corner = det.resolution_angstrom(pos)
    return {
        "path": str(path),
        "n_images": n_images,
        "det_shape": tuple(int(x) for x in pos.shape[:-1]),
        "n_ranks": size,
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
        "intensity_scale": 1.0 if scale is None else scale,
        "structure_name": structure.name,
        "n_atoms": structure.n_atoms,
    }


def _create_everywhere(comm: Any, tmp: Path, structure: Structure, **kwargs: Any) -> Any:
    """Rank 0 creates the file (:func:`_create_file`, returns the open h5py file; None
    elsewhere); every rank learns whether it could, so none waits in vain (collective).
    OutputError on every rank when it could not."""
    failure, h5 = None, None
    if comm.Get_rank() == 0:
        try:
            h5 = _create_file(tmp, structure, **kwargs)
        except OutputError as exc:
            failure = str(exc)
    failure = bcast_object(comm, failure)
    if failure is not None:
        raise _everywhere(OutputError(failure))
    return h5


def _create_file(tmp: Path, structure: Structure, *, n_images: int, pos: np.ndarray,
                 mask: np.ndarray, M: int, reciprocal_extent: float, seed: int,
                 pixel_size_m: float, distance_m: float, photon_energy_ev: float,
                 wavelength: float, photons_per_image: float | None, fluence_jitter: float,
                 beamstop_radius_px: float, scale: float, eps: float):
    """Create the ``.partial`` file with everything except the image rows (rank 0 only)."""
    import h5py

    try:
        h5 = h5py.File(tmp, "w")
    except OSError as exc:
        raise OutputError(f"{tmp}: cannot create the dataset file: {exc}") from exc
    try:
        _fill_file(h5, structure, n_images=n_images, pos=pos, mask=mask, M=M,
                   reciprocal_extent=reciprocal_extent, seed=seed, pixel_size_m=pixel_size_m,
                   distance_m=distance_m, photon_energy_ev=photon_energy_ev,
                   wavelength=wavelength, photons_per_image=photons_per_image,
                   fluence_jitter=fluence_jitter, beamstop_radius_px=beamstop_radius_px,
                   scale=scale, eps=eps)
    except BaseException:
        h5.close()
        raise
    return h5


def _fill_file(h5, structure: Structure, *, n_images: int, pos: np.ndarray, mask: np.ndarray,
               M: int, reciprocal_extent: float, seed: int, pixel_size_m: float,
               distance_m: float, photon_energy_ev: float, wavelength: float,
               photons_per_image: float | None, fluence_jitter: float,
               beamstop_radius_px: float, scale: float, eps: float) -> None:
    """Write every dataset and attribute except the image rows."""
    det_shape = pos.shape[:-1]
    h5.create_dataset("intensities", shape=(n_images,) + det_shape, dtype=np.float32)
    h5.create_dataset("orientations", shape=(n_images, 4), dtype=np.float64)
    h5.create_dataset("fluences", shape=(n_images,), dtype=np.float64)
    h5.create_dataset("pixel_position_reciprocal", data=pos)
    h5.create_dataset("pixel_index_map", data=det.pixel_index_map(det_shape[-1]))
    h5.create_dataset("mask", data=mask.astype(np.uint8))
    attrs = {
        "reciprocal_extent": reciprocal_extent,
        "n_images": n_images,
        "n_pixels_per_image": int(np.prod(det_shape)),
        "det_shape": np.array(det_shape, dtype=np.int64),
        "det_distance": float(distance_m),
        "pixel_size": float(pixel_size_m),
        "photon_energy_ev": float(photon_energy_ev),
        "wavelength_m": float(wavelength),
        "seed": int(seed),
        "photons_per_image": np.nan if photons_per_image is None else float(photons_per_image),
        "noise": "none" if photons_per_image is None else "poisson",
        "fluence_jitter": float(fluence_jitter),
        "beamstop_radius_px": float(beamstop_radius_px),
        "intensity_scale": float(scale),
        "nufft_eps": float(eps),
        "structure_name": structure.name,
        "generator": f"spinifel-mpi {__version__} simulate",
    }
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
