"""Benchmark of the polar orientation search against its limit and against exhaustive search.

Seconds are wall time (``seconds``, the parts) and this process's CPU time (``cpu_seconds``;
the limits are CPU seconds), since the machine may be shared with other work: with 1 thread
per rank the CPU time is what the search costs a dedicated core.

``polar_bench`` times one whole polar search per rank (the directions split over the ranks,
:func:`spinifel.orientation.polar.match_polar_distributed`: what one generation's search
costs) and, in the same run, the bare library operations it is made of on the same shapes:

=============  ==============================================================
part           limit
=============  ==============================================================
slicing        finufft type-2 plans on the same polar points (one batch, scaled)
correlation    the complex GEMMs (one per frequency and annulus), the real FFTs of
               the slice rings and the folded inverse FFTs of the same shapes
rescoring      a finufft type-2 plan on the candidates' pixels
=============  ==============================================================

Agreement with exhaustive search is measured on a sub-grid small enough for exhaustive
search (a subset of the beam directions with all in-plane angles), on Poisson images at
orientations near that sub-grid.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from spinifel.backend.nufft import Type2
from spinifel.geometry.orientations import angle_between, multiply, random_quaternions
from spinifel.geometry.points import rotated_points
from spinifel.orientation.matching import _rotvec_to_quaternion, match_orientations
from spinifel.orientation.polar import (
    PolarSlicer,
    direction_quaternions,
    fibonacci_directions,
    make_polar_grid,
    match_polar,
    match_polar_distributed,
    polar_orientation_grid,
    polar_points,
    polar_sizes,
)
from spinifel.orientation.slicing import Slicer
from spinifel.parallel.collectives import allgather_objects, barrier
from spinifel.parallel.partition import block_range


def _clock(fn) -> float:
    """CPU seconds of this process running ``fn`` (1 thread per rank: robust to other load
    on a shared machine, unlike wall time)."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def grid_step(n_dir: int, n_psi: int) -> float:
    """One step of the factorised grid, radians: the larger of the in-plane step and the
    largest nearest-neighbour angle of the beam directions."""
    from scipy.spatial import cKDTree

    d = fibonacci_directions(n_dir)
    dist, _ = cKDTree(d).query(d, k=2)
    return max(2 * np.pi / n_psi, float(2 * np.arcsin(dist[:, 1].max() / 2)))


def _limits(grid, ac, extent, dirs, batch, n_img, n_batches, dtype, threads) -> dict:
    """Bare-library CPU seconds of the polar search's parts on one batch, times
    ``n_batches``."""
    import scipy.fft

    rng = np.random.default_rng(0)
    cdt = np.result_type(dtype, np.complex64)
    plan = Type2(ac.shape, 1e-4, dtype, threads)
    modes = ac.astype(plan.complex_dtype)
    pts = rotated_points(dirs[:batch], polar_points(grid), extent, dtype)
    t_nufft = _clock(lambda: (plan.setpts(pts), plan.execute(modes)))
    t_gemm = t_fft = 0.0
    for a in grid.annuli:
        F, K = a.n_angles // 2 + 1, a.n_rings
        x = (rng.standard_normal((F, n_img, K)) + 1j).astype(cdt)
        y = (rng.standard_normal((F, K, batch)) + 1j).astype(cdt)
        t_gemm += _clock(lambda: np.matmul(x, y))
        ring = rng.standard_normal((batch, K, a.n_angles)).astype(dtype)
        # slice spectra plus the Gram correlations of the norms: one rfft each
        t_fft += (1 + len(a.gram)) * _clock(lambda: scipy.fft.rfft(ring, axis=2))
    fold = (rng.standard_normal((grid.n_psi, n_img, batch)) + 1j).astype(cdt)
    t_fft += _clock(lambda: scipy.fft.ifft(fold, axis=0))
    return {"slicing": t_nufft * n_batches, "gemm": t_gemm * n_batches,
            "fft": t_fft * n_batches}


def agreement(images_clean_fn, ac, pos, extent, n_dir, n_psi, n_sub, n_images, photons, seed,
              dtype, threads, batch, candidates) -> dict:
    """Polar vs exhaustive search on the sub-grid of ``n_sub`` evenly spread directions x all
    ``n_psi`` angles, ``n_images`` Poisson images (``photons`` per image) at sub-grid
    orientations turned by random rotations of up to half a grid step."""
    rng = np.random.default_rng([seed, 15])
    sub = np.linspace(0, n_dir - 1, n_sub).astype(np.int64)
    full = polar_orientation_grid(n_dir, n_psi).reshape(n_dir, n_psi, 4)
    grid = full[sub].reshape(-1, 4)
    step = grid_step(n_dir, n_psi)
    v = rng.standard_normal((n_images, 3))
    v *= (0.5 * step * rng.uniform(0, 1, (n_images, 1))) / np.linalg.norm(v, axis=1, keepdims=True)
    truth = multiply(grid[rng.choice(len(grid), n_images)], _rotvec_to_quaternion(v))
    clean = np.maximum(images_clean_fn(truth), 0)
    images = rng.poisson(clean * (photons / clean.sum(1, keepdims=True))).astype(dtype)
    slicer = Slicer(ac, pos, extent, 1e-4, dtype, threads)
    t = time.perf_counter()
    exh = match_orientations(images, slicer.iter_batches(grid, 256), True, 4096, "sqrt")
    t_exh = time.perf_counter() - t
    pg = make_polar_grid(pos, n_psi)
    dirs = direction_quaternions(fibonacci_directions(n_dir))[sub]
    t = time.perf_counter()
    pol = match_polar(images, pg, PolarSlicer(ac, pg, extent, 1e-4, dtype, threads)
                      .iter_batches(dirs, batch), True, "sqrt", 512, dtype, candidates,
                      (grid, slicer))
    t_pol = time.perf_counter() - t
    err = angle_between(grid[pol.best_index], grid[exh.best_index])
    return {"sub_directions": int(n_sub), "sub_orientations": int(len(grid)),
            "images": int(n_images), "photons_per_image": float(photons),
            "grid_step_deg": float(np.degrees(step)),
            "same_orientation": float(np.mean(pol.best_index == exh.best_index)),
            "within_one_step": float(np.mean(err <= step)),
            "exhaustive_seconds": t_exh, "polar_seconds": t_pol}


def polar_bench(comm: Any, *, images: np.ndarray, ac: np.ndarray, pos: np.ndarray,
                extent: float, n_orientations: int, n_psi: int = 0, dtype=np.float32,
                threads: int = 1, batch: int = 0, candidates: int = 2, seed: int = 0,
                agreement_directions: int = 0, agreement_images: int = 0,
                photons: float = 1e4) -> dict:
    """One generation's polar search on this rank's ``images`` (collective), its limit, and
    (rank 0, when ``agreement_directions`` > 0) agreement with exhaustive search."""
    rank, size = comm.Get_rank(), comm.Get_size()
    n_dir, n_psi = polar_sizes(n_orientations, n_psi)
    t0, c0 = time.perf_counter(), time.process_time()
    pg = make_polar_grid(pos, n_psi)
    t_grid, c_grid = time.perf_counter() - t0, time.process_time() - c0
    dirs = direction_quaternions(fibonacci_directions(n_dir))
    grid = polar_orientation_grid(n_dir, n_psi)
    # the solver's batch: as many model values as 500 ordinary slices
    batch = batch or max(1, min(n_dir, 500 * pos.shape[1] // pg.n_points))
    slicer = Slicer(ac, pos, extent, 1e-4, dtype, threads)
    polar = PolarSlicer(ac, pg, extent, 1e-4, dtype, threads)
    timings: dict = {}
    parts: dict = {}
    barrier(comm)
    t0, c0 = time.perf_counter(), time.process_time()
    match_polar_distributed(comm, images, pg, polar, dirs, batch, True, "sqrt", 512, dtype,
                            candidates, (grid, slicer), timings, parts)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_all = sum(allgather_objects(comm, len(images)))
    a, b = block_range(n_dir, size, rank)
    n_batches = -(-(b - a) // batch)
    lim = _limits(pg, ac, extent, dirs, min(batch, b - a), n_all, n_batches, dtype, threads)
    plan = Type2(ac.shape, 1e-4, dtype, threads)
    pts = rotated_points(random_quaternions(len(images) * candidates,
                                            np.random.default_rng(seed)), pos, extent, dtype)
    modes = ac.astype(plan.complex_dtype)
    lim["rescoring"] = _clock(lambda: (plan.setpts(pts), plan.execute(modes)))
    total += t_grid  # the grid is rebuilt every generation (the matched pixels change)
    cpu += c_grid
    out = {"seconds": total, "cpu_seconds": cpu, "limit_seconds": sum(lim.values()),
           "limit_parts": lim,
           "parts": {"grid": t_grid, "slicing": timings["slicing"],
                     "rescoring": parts["rescoring"],
                     "correlation": total - t_grid - timings["slicing"] - parts["rescoring"]},
           "directions": n_dir, "n_psi": n_psi, "orientations": n_dir * n_psi,
           "polar_points": pg.n_points, "annuli": [[a.n_rings, a.n_angles] for a in pg.annuli],
           "pixels": int(pos.shape[1]), "images_all_ranks": int(n_all),
           "directions_this_rank": int(b - a), "candidates": candidates, "batch": batch,
           "grid_step_deg": float(np.degrees(grid_step(n_dir, n_psi)))}
    # the limits are CPU seconds: compare with our CPU seconds
    out["fraction_of_limit"] = out["limit_seconds"] / cpu
    barrier(comm)
    if rank == 0 and agreement_directions > 0:
        s = Slicer(ac, pos, extent, 1e-6, dtype, threads)
        out["agreement"] = agreement(
            s.slices, ac, pos, extent, n_dir, n_psi, min(agreement_directions, n_dir),
            agreement_images or len(images), photons, seed, dtype, threads, batch, candidates)
    barrier(comm)
    return out
