"""The reconstruction problem, built once per run: backends, data, geometry, grids, masks.

:meth:`Problem.open` reads metadata only (every rank: dataset structure, shard bounds,
detector geometry) and checks the configuration against it; :meth:`Problem.plan` is the
dry run; :meth:`Problem.load` reads this rank's images and builds everything the
generations share (orientation grid, support, Fourier mask, half-set rows, batch sizes,
the ground truth on rank 0). Nothing here changes between generations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from spinifel.backend.arrays import to_module
from spinifel.backend.select import Backends
from spinifel.config import Config
from spinifel.errors import ConfigError, DatasetError, SpinifelError
from spinifel.geometry.orientations import grid_spacing, orientation_grid
from spinifel.io.dataset import (
    DatasetInfo,
    DetectorGeometry,
    inspect_dataset,
    read_geometry,
    read_shard,
    shard_bounds,
)
from spinifel.merging.merge import ball_support
from spinifel.parallel.collectives import allgather_objects, allreduce_sum
from spinifel.parallel.context import ParallelContext, collective

log = logging.getLogger("spinifel")

#: The flat or radial background is taken from the data (:meth:`Problem._data_background`)
#: when its error is below this fraction of the dimmest shell's mean count (radial: each
#: shell's error below this fraction of that shell's mean count). The error grows as the fluence spread shrinks; without a
#: spread the data cannot tell a background from a flat part of the signal.
MAX_FLAT_BACKGROUND_ERROR = 0.1


def measured_fourier_mask(M: int, positions: np.ndarray, reciprocal_extent: float) -> np.ndarray:
    """Centred ``(M, M, M)`` mask of the reciprocal grid points the data can reach.

    Rotating the detector over all orientations covers the shell between the smallest and
    the largest ``|s|`` of the good pixels; the cube's corners beyond it and the beamstop
    hole inside it are not measured, so phasing must not impose amplitudes there.
    """
    s = np.linalg.norm(positions, axis=0)
    step = 2.0 * reciprocal_extent / M  # reciprocal grid spacing 1 / (M d)
    k = (np.arange(M) - (M - 1) / 2) * step
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    # half a grid step of margin: grid points on the boundary are interpolated from data
    return (r >= s.min() - 0.5 * step) & (r <= s.max() + 0.5 * step)


def check_backend_config(cfg: Config, xp: Any) -> None:
    """Refuse settings the chosen array backend cannot run (ConfigError, one line).

    ``algorithm.search = "coarse_to_fine"`` or ``"polar"`` runs on the CPU path only
    (``xp`` numpy).
    """
    search = cfg.algorithm.search
    if xp is not np and search in ("coarse_to_fine", "polar"):
        raise ConfigError(f"config key 'algorithm.search': '{search}' runs on the CPU path "
                          "only in this version; use 'exhaustive' with the GPU backend")


def check_half_sets(cfg: Config, n_images: int) -> None:
    """Half sets need at least 4 images (two per half): ConfigError otherwise."""
    if cfg.validation.half_sets != "off" and n_images < 4:
        raise ConfigError(f"config key 'validation.half_sets': needs at least 4 images, "
                          f"the run has {n_images}")


@dataclass
class Problem:
    """Everything the generations share (built once; see the module docstring).

    Attributes set by :meth:`open` (every rank): ``cfg``, ``ctx``, ``backends``,
    ``info``, ``n_images``, ``start``/``stop`` (this rank's rows in file order), ``geom``.
    Set by :meth:`load`: ``images`` (n_local, P) in ``real`` on the array module ``xp``,
    ``positions`` (3, P) float64 host and ``d_positions`` on ``xp`` (inverse metres),
    ``grid`` (K, 4) orientation grid (``algorithm.search = "polar"``: the factorised grid
    of ``polar_sizes`` = (beam directions, in-plane angles)), ``support`` (M, M, M) bool autocorrelation support,
    ``fourier_mask`` (M, M, M) bool measured shell, ``s_norm`` (P,) ``|s|`` per pixel,
    ``halves`` (n_local,) int half of each local image or None, ``half_rows`` per half
    a (host mask, mask on ``xp``) pair or None, ``orientation_batch`` / ``image_batch``,
    ``truth`` (rank 0 only, when evaluation is on and the dataset has it), ``shard``,
    ``s_all`` (n_pixels,) ``|s|`` of every detector pixel, masked or not (matching cutoff),
    and under ``algorithm.score = "poisson"``: the images are photon counts
    (:func:`~spinifel.orientation.likelihood.photon_counts`), ``mean_image`` (P,) float64
    the mean over ALL images (every rank; background estimate, None unless
    ``algorithm.background`` is set) and ``shells`` (P,) int64 the background shell of each
    good pixel, and with ``algorithm.background = "flat"`` or ``"radial"``
    ``data_background`` (a float for flat, an (n_shells,) float64 array for radial, or None)
    the background from the data alone (:meth:`_data_background`; ``background_report`` its
    estimate, errors and whether it was used, for ``metrics.json``). With
    ``algorithm.M = 0``, :meth:`load` replaces ``cfg`` by one with the chosen ``M``
    (:meth:`choose_box`).
    """

    cfg: Config
    ctx: ParallelContext
    backends: Backends
    info: DatasetInfo
    n_images: int
    start: int
    stop: int
    geom: DetectorGeometry
    io_seconds: float = 0.0
    shard: Any = None
    images: Any = None
    positions: np.ndarray | None = None
    d_positions: Any = None
    grid: np.ndarray | None = None
    support: np.ndarray | None = None
    fourier_mask: np.ndarray | None = None
    s_norm: np.ndarray | None = None
    halves: np.ndarray | None = None
    half_rows: list | None = None
    cv_rows: list | None = None
    orientation_batch: int = 0
    image_batch: int = 0
    truth: Any = None
    s_all: np.ndarray | None = None
    mean_image: np.ndarray | None = None
    shells: np.ndarray | None = None
    data_background: Any = None
    background_report: dict | None = None
    polar_sizes: tuple[int, int] | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def open(cls, cfg: Config, ctx: ParallelContext) -> Problem:
        """Backends, dataset structure, shard bounds and geometry (collective; no images)."""
        comm = ctx.comm
        if not cfg.data.path:
            raise SpinifelError("config key 'data.path': no dataset given (set it in the config "
                                "or with --set data.path=FILE)")
        be = select_run_backends(cfg, ctx)
        check_backend_config(cfg, be.xp)
        t_io = time.perf_counter()
        path = cfg.data.path
        info = collective(comm, inspect_dataset, path, cfg.data.format)
        n_images = info.n_images if cfg.data.n_images == 0 else min(cfg.data.n_images,
                                                                    info.n_images)
        start, stop = collective(comm, shard_bounds, n_images, ctx.size, ctx.rank)
        geom = collective(comm, read_geometry, path, cfg.detector.clip, cfg.detector.binning,
                          cfg.data.format)
        if cfg.algorithm.use_true_orientations and not info.has_orientations:
            raise DatasetError(path, "orientations", "algorithm.use_true_orientations is set but "
                               "the dataset has no orientations")
        check_half_sets(cfg, n_images)
        return cls(cfg=cfg, ctx=ctx, backends=be, info=info, n_images=n_images, start=start,
                   stop=stop, geom=geom, io_seconds=time.perf_counter() - t_io)

    def plan(self) -> dict:
        """The dry run's plan (collective): ranks, images, pixels, memory, backends."""
        return {"ranks": self.ctx.size, "n_images": self.n_images,
                "images_per_rank": allgather_objects(self.ctx.comm, self.n_local),
                "pixels": int(self.geom.mask.sum()),
                "memory_per_rank_bytes": self.memory_estimate(),
                "array_backend": self.backends.array, "nufft_backend": self.backends.nufft}

    def load(self) -> Problem:
        """Read this rank's images and build the shared arrays (collective); returns self."""
        cfg, comm, a = self.cfg, self.ctx.comm, self.cfg.algorithm
        from spinifel.runtime import check_memory

        # Refuse (one line, every rank) before reading anything when the estimate cannot
        # fit in this rank's share of the node's available memory; warn when it is close.
        msg = collective(comm, check_memory, self.memory_estimate(), self.ctx.node_size)
        if msg and self.ctx.rank == 0:
            log.warning(msg)
        t_io = time.perf_counter()
        self.shard = collective(comm, read_shard, cfg.data.path, self.start, self.stop,
                                cfg.detector.clip, cfg.detector.binning, cfg.data.negative,
                                self.geom, cfg.data.format)
        self.io_seconds += time.perf_counter() - t_io
        if cfg.validation.half_sets != "off":
            from spinifel.validation.halves import half_assignment

            self.halves = half_assignment(self.n_images, cfg.runtime.seed)[self.start:self.stop]
        xp = self.xp
        good = self.geom.mask
        self.positions = np.ascontiguousarray(self.geom.positions[:, good])
        images = np.ascontiguousarray(self.shard.images[:, good], dtype=self.real)
        if a.score == "auto":
            self.resolve_score(images)
            a = self.cfg.algorithm
        if a.score == "poisson":
            images = self._photon_counts(images)
        if a.M == 0:
            self.choose_box(images)
            a = self.cfg.algorithm
        # GPU path: images and pixel positions go to the device once
        self.images, self.d_positions = to_module(images, xp), to_module(self.positions, xp)
        # each half's local rows: a host mask (orientations) and one for the images' module
        self.half_rows = None if self.halves is None else [
            (self.halves == h, to_module(self.halves == h, xp)) for h in (0, 1)]
        # Rows of the two-fold split that chooses lambda (algorithm.lambda_choice =
        # "holdout"): the half sets when they are on, else the same seeded split.
        self.cv_rows = self.half_rows
        if (self.cv_rows is None and a.lambda_choice == "holdout" and len(a.lambdas) > 1
                and self.n_images >= 2):
            from spinifel.validation.halves import half_assignment

            cv = half_assignment(self.n_images, cfg.runtime.seed)[self.start:self.stop]
            self.cv_rows = [(cv == h, to_module(cv == h, xp)) for h in (0, 1)]
        self.orientation_batch, self.image_batch = _batches(cfg, self.backends, int(good.sum()))
        self._log_data()
        if a.search == "polar":
            from spinifel.orientation.polar import polar_orientation_grid, polar_sizes

            self.polar_sizes = polar_sizes(a.n_orientations, a.polar_n_psi)
            self.grid = polar_orientation_grid(*self.polar_sizes)
        else:
            self.grid = orientation_grid(a.n_orientations)
        self.support = ball_support(a.M, a.ac_support_radius)
        self.fourier_mask = measured_fourier_mask(a.M, self.positions, self.extent)
        self.s_norm = np.linalg.norm(self.positions, axis=0)
        self.s_all = np.linalg.norm(self.geom.positions.reshape(3, -1), axis=0)
        if a.score == "poisson" and a.background != "none":
            from spinifel.orientation.background import shell_index

            total = np.ascontiguousarray(images.sum(axis=0, dtype=np.float64))
            self.mean_image = allreduce_sum(comm, total) / max(self.n_images, 1)
            self.shells = shell_index(self.positions, a.background_shells)
            self.data_background = self._data_background(images)
        if cfg.evaluation.enabled and self.ctx.rank == 0 and self.info.has_ground_truth:
            from spinifel.evaluate.report import load_ground_truth

            self.truth = load_ground_truth(cfg.data.path, a.M, self.extent)
        return self

    def resolve_score(self, images: np.ndarray) -> str:
        """``algorithm.score = "auto"`` (collective): "poisson" when the data are photon
        counts on every rank (``data.adu_per_photon > 0`` converts them; else every value
        within 1e-3 of a non-negative integer, the rule of
        :func:`~spinifel.orientation.likelihood.photon_counts`) and the other settings
        allow it, else "euclidean". Replaces ``cfg`` by one with the choice (and the
        refinement rounds it implies); logs the reason on rank 0."""
        from spinifel.config import poisson_supported
        from spinifel.orientation.likelihood import are_photon_counts
        from spinifel.parallel.collectives import all_true

        a = self.cfg.algorithm
        counts = all_true(self.ctx.comm, self.cfg.data.adu_per_photon > 0
                          or are_photon_counts(images))
        blocked = poisson_supported(a)
        score = "poisson" if counts and not blocked else "euclidean"
        why = ("the data are photon counts" if counts and not blocked
               else f"photon counts, but {blocked} needs the Euclidean score" if counts
               else "the data are not photon counts (non-integer or negative values)")
        if self.ctx.rank == 0:
            log.info("algorithm.score = 'auto': %s: %s", why, score)
        self.cfg = dataclasses.replace(self.cfg, algorithm=dataclasses.replace(a, score=score))
        return score

    def _data_background(self, images: np.ndarray) -> Any:
        """``algorithm.background = "flat"`` or ``"radial"``: the background from the data
        alone (:func:`~spinifel.orientation.background.flat_background_from_data`, a float,
        or :func:`~spinifel.orientation.background.radial_background_from_data`, per shell;
        collective). None, with a warning, when its error exceeds
        :data:`MAX_FLAT_BACKGROUND_ERROR` of the dimmest shell's mean count (radial: of each
        shell's; too little fluence spread): the estimate then falls back to the model
        fit."""
        from spinifel.orientation.background import (
            flat_background_from_data,
            radial_background_from_data,
            shell_moments,
        )

        mode, n_shells = self.cfg.algorithm.background, self.cfg.algorithm.background_shells
        moments = allreduce_sum(self.ctx.comm, shell_moments(
            images, self.shells, n_shells, np.arange(self.start, self.stop)))
        pixels = np.bincount(self.shells, minlength=n_shells)
        has = pixels > 0
        mean_count = moments[:, 0].sum(axis=0)[has] / pixels[has] / max(self.n_images, 1)
        if mode == "flat":
            b, error = flat_background_from_data(moments, pixels)
            text = f"{b:.4g} +- {error:.2g} photons/pixel"
            ok = error <= MAX_FLAT_BACKGROUND_ERROR * float(np.min(mean_count))
        else:  # per shell: its error against its own mean count
            b, errors = radial_background_from_data(moments, pixels)
            relative = float(np.max(errors[has] / mean_count))
            text = (f"{float(np.min(b[has])):.4g} .. {float(np.max(b)):.4g} photons/pixel "
                    f"over the shells, error up to {relative:.2g} of a shell's mean count")
            ok = relative <= MAX_FLAT_BACKGROUND_ERROR
            error = float(np.max(errors[has]))
        if self.ctx.rank == 0:
            log.info("%s background from the data: %s", mode, text)
        self.background_report = {
            "mode": mode, "used": bool(ok),
            "photons_per_pixel": b if mode == "flat" else [float(x) for x in b],
            "error": error if mode == "flat" else [float(x) for x in errors],
            "shell_pixels": [int(x) for x in pixels]}
        if not ok:
            if self.ctx.rank == 0:
                log.warning("the %s background from the data (error %.2g photons/pixel) is "
                            "not determined: the fluence hardly varies between the images; it "
                            "is fitted against the model instead (biased by the model's own "
                            "flat part)", mode, error)
            return None
        return b

    def _photon_counts(self, images: np.ndarray) -> np.ndarray:
        """This rank's images as photon counts (collective: a DatasetError on any rank is
        raised on all of them)."""
        from spinifel.orientation.likelihood import photon_counts

        cfg = self.cfg
        return collective(self.ctx.comm, photon_counts, images, cfg.data.adu_per_photon,
                          cfg.data.path, self.info.images_dataset)

    def choose_box(self, images: np.ndarray) -> int:
        """``algorithm.M = 0``: choose ``M`` from the radial average of ALL images (collective).

        The per-rank radial sums of the good pixels are summed over the ranks; the particle
        diameter comes from :func:`spinifel.geometry.box.estimate_diameter` and ``M`` from
        :func:`spinifel.geometry.box.choose_M`. Replaces ``self.cfg`` by a config with that
        ``M`` (identical on every rank) and returns it; logs the box in angstrom and warns
        when the estimate is not reliable (the low-``|s|`` speckles are not measured).
        """
        from spinifel.geometry.box import (
            choose_M,
            estimate_diameter,
            radial_edges,
            radial_profile,
            radial_sums,
        )

        a = self.cfg.algorithm
        s = np.linalg.norm(self.positions, axis=0)
        edges = radial_edges(s)
        sums = allreduce_sum(self.ctx.comm, np.ascontiguousarray(radial_sums(images, s, edges)))
        est = estimate_diameter(radial_profile(sums, s, edges))
        M = choose_M(est.diameter_m, self.extent, ac_support_radius=a.ac_support_radius)
        self.cfg = dataclasses.replace(self.cfg, algorithm=dataclasses.replace(a, M=M))
        log.info("algorithm.M = 0: particle diameter %.1f A from the radial average (fit %.1f A, "
                 "reduced chi2 %.2f) -> M = %d, box %.1f A (voxel %.2f A)",
                 est.diameter_m * 1e10, est.fitted_m * 1e10, est.reduced_chi2, M,
                 M * self.voxel_angstrom, self.voxel_angstrom)
        if not est.reliable and self.ctx.rank == 0:
            log.warning("the diameter estimate is not reliable: the smallest measured |s| "
                        "(%.4f 1/A) is beyond the first speckles of a %.1f A particle (beamstop "
                        "too large?); set algorithm.M explicitly", est.s_min * 1e-10,
                        est.diameter_m * 1e10)
        return M

    def _log_data(self) -> None:
        comm, good = self.ctx.comm, self.geom.mask
        per_rank = allgather_objects(comm, self.n_local)
        log.info("data: %d images on %d ranks (%d..%d per rank), %d good pixels of %d; "
                 "resolution at the detector corner %.2f A; grid M=%d, voxel %.2f A",
                 self.n_images, self.ctx.size, min(per_rank),
                 max(allgather_objects(comm, self.n_local)), int(good.sum()), good.size,
                 1.0 / self.extent_inv_angstrom, self.cfg.algorithm.M, self.voxel_angstrom)
        log.info("memory estimate per rank: %.1f MiB", self.memory_estimate() / 2**20)

    # ---------------------------------------------------------------- derived values
    @property
    def xp(self) -> Any:
        """Array module of the images and of the merge (numpy or cupy)."""
        return self.backends.xp

    @property
    def real(self) -> Any:
        """Image and slice dtype (``runtime.precision``)."""
        return np.float32 if self.cfg.runtime.precision == "single" else np.float64

    @property
    def n_local(self) -> int:
        """Images on this rank."""
        return self.stop - self.start

    @property
    def extent(self) -> float:
        """Largest ``|s|`` of the detector, inverse metres."""
        return self.geom.reciprocal_extent

    @property
    def extent_inv_angstrom(self) -> float:
        return self.extent * 1e-10

    @property
    def voxel_angstrom(self) -> float:
        """Real-space voxel size ``1 / (2 extent)`` in angstrom."""
        return 1.0 / (2.0 * self.extent) * 1e10

    @property
    def grid_spacing_deg(self) -> float:
        return math.degrees(grid_spacing(self.cfg.algorithm.n_orientations))

    def memory_estimate(self) -> int:
        """Rough peak bytes per rank (see :func:`_memory_estimate`)."""
        return _memory_estimate(self.cfg, self.n_local, int(self.geom.mask.sum()),
                                int(self.geom.mask.size))

    def initial_orientations(self) -> np.ndarray:
        """Generation 0's local orientations ``(n_local, 4)`` float64: the dataset's
        (validation mode) or seeded random ones (independent of the rank count)."""
        from spinifel.geometry.orientations import random_quaternions

        if self.cfg.algorithm.use_true_orientations:
            log.info("using the dataset's true orientations (validation mode): no matching")
            return np.asarray(self.shard.orientations, dtype=np.float64).reshape(-1, 4)
        rng0 = np.random.default_rng([self.cfg.runtime.seed, 0, 3])
        return random_quaternions(self.n_images, rng0)[self.start:self.stop]


def select_run_backends(cfg: Config, ctx: ParallelContext) -> Backends:
    """Choose and log the array and NUFFT backends; on a GPU, bind this rank to its device.

    ``runtime.backend = "cupy"`` without a usable GPU is a ConfigError (never a silent
    fall-back); ``"auto"`` takes the GPU when CuPy sees one and cufinufft imports. All
    ranks decide together: if any rank cannot use the GPU under ``auto``, all use numpy.
    """
    from spinifel.backend.select import bind_device, select_backends

    be = collective(ctx.comm, select_backends, cfg.runtime.backend, cfg.runtime.nufft_backends)
    if ctx.size > 1:
        from spinifel.backend.select import mixed_gpu_warning

        flags = allgather_objects(ctx.comm, (bool(be.gpu), be.reason))
        if not all(g for g, _ in flags):
            msg = mixed_gpu_warning([g for g, _ in flags], [r for _, r in flags])
            be = select_backends("numpy", cfg.runtime.nufft_backends)
            if msg:  # some ranks have a GPU, others not: say which, never silently
                if ctx.rank == 0:
                    log.warning(msg)
                be = Backends(be.array, be.xp, be.nufft, "runtime.backend = auto: not every "
                              "rank sees a GPU", be.skipped)
    be = bind_device(be, ctx.node_rank, ctx.node_size)
    log.info("array backend %s (%s); NUFFT backend %s%s", be.array, be.reason, be.nufft,
             "".join(f"; skipped {k}: {v}" for k, v in be.skipped.items()))
    return be


def _batches(cfg: Config, be: Backends, n_pixels: int) -> tuple[int, int]:
    """``algorithm.orientation_batch`` / ``image_batch``, capped by free device memory on a GPU."""
    from spinifel.backend.select import batch_caps, free_device_bytes

    a = cfg.algorithm
    free = free_device_bytes(be.xp)
    if free is None:
        return a.orientation_batch, a.image_batch
    cap_o, cap_i = batch_caps(free, n_pixels, cfg.runtime.precision)
    ob, ib = min(a.orientation_batch, cap_o), min(a.image_batch, cap_i)
    log.info("device memory free %.1f GiB: orientation_batch %d, image_batch %d", free / 2**30,
             ob, ib)
    return ob, ib


# Host memory of a rank before any array of the run: the interpreter and its libraries
# (importing numpy, scipy, h5py, finufft, mpi4py and spinifel alone: 120 MiB), MPI, FFT plans
# and caches. With the (2M)^3 coefficient below, fitted to the peak RSS measured on 2 ranks
# (docs/data/memory/, docs/scaling.md: M 31-101, 1000-4000 images per rank).
RUNTIME_BASE_BYTES = 160 * 2**20
# Bytes per (2M)^3 voxel at the merge's peak (the Toeplitz kernel's type-1 NUFFT: its
# complex128 accumulator, finufft's upsampled work grid and output; finufft 2.5.1), fitted
# with RUNTIME_BASE_BYTES to the measured peaks.
KERNEL_BYTES_PER_VOXEL = 40
# Bytes per merge point (one pixel of one image in an image_batch block): rotated
# coordinates (24), finufft's sort indices for two plans (16), the float64 image block, its
# weighted values and their complex128 copy (32), the tiled weights (8).
MERGE_BYTES_PER_POINT = 80


def _memory_estimate(cfg: Config, n_local: int, n_pixels: int,
                     n_pixels_all: int | None = None) -> int:
    """Peak host bytes per rank: the runtime, images, one slice batch and its GEMM block,
    one merge block, grids.

    Parameters
    ----------
    cfg : Config
    n_local : int
        Images on this rank.
    n_pixels : int
        Good pixels per image (those the run uses).
    n_pixels_all : int, optional
        All pixels per image, masked included (the shard as read); default ``n_pixels``.

    Returns
    -------
    int
        Bytes. Checked against the peak RSS of real runs in docs/scaling.md (within 3% on
        the fitted cases).
    """
    a = cfg.algorithm
    item = 4 if cfg.runtime.precision == "single" else 8
    n_all = n_pixels if n_pixels_all is None else n_pixels_all
    # the shard as read (float32, all pixels), the good pixels, the matching's transformed copy
    images = n_local * (4 * n_all + 2 * item * n_pixels)
    slices = a.orientation_batch * n_pixels * (item + 8 * 3 + 8)
    gemm = min(a.image_batch, max(n_local, 1)) * a.orientation_batch * 8 * 2
    merge_pts = min(a.image_batch, max(n_local, 1)) * n_pixels * MERGE_BYTES_PER_POINT
    grids = KERNEL_BYTES_PER_VOXEL * (2 * a.M) ** 3 + a.M ** 3 * 8 * 8
    # the multi-shift sweep holds two vectors per lambda (three sweeps under holdout; one
    # lambda is never swept)
    holdout = a.lambda_choice == "holdout" and len(a.lambdas) > 1
    grids += (2 * len(a.lambdas) + 4) * a.M ** 3 * 8 * (2 if holdout else 1)
    if a.search == "coarse_to_fine":
        # the fine pass holds the fine slices its candidates need: with many images up to
        # the whole fine grid, capped by coarse_max_fine_slices
        held = a.n_orientations if a.coarse_max_fine_slices == 0 else min(
            a.n_orientations, a.coarse_max_fine_slices)
        slices += held * n_pixels * item
    if a.score in ("poisson", "auto"):  # auto: the larger, before the data decide
        # the streaming posterior's top-k buffer (3k scores and indices per image) and the
        # k selected at the end (not fitted to a measurement: the Euclidean runs were)
        k = max(a.orientations_per_image, 1)
        images += n_local * (3 * k + k) * 16
    return int(RUNTIME_BASE_BYTES + images + slices + gemm + merge_pts + grids)
