"""The M-TIP generation loop (SPMD: every rank runs this with its own image shard).

Data flow per generation::

    shard of images --(slicing + matching: orientations)--> local orientations
    local images + orientations --(type-1 NUFFTs, Allreduce)--> normal equations
    normal equations --(CG per lambda, L-curve, Bcast)--> merged autocorrelation
    merged autocorrelation --(phasing on rank 0, Bcast)--> density, support, phased ac
    rank 0 --> result.h5 / MRC / metrics.json (+ evaluation when ground truth exists)

Generation 0 merges with random (seeded) orientations. Every random choice derives from
``runtime.seed`` and the generation number, never from the rank, so the result does not
depend on the number of ranks beyond round-off.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinifel.config import Config
from spinifel.errors import ConfigError, DatasetError, SpinifelError
from spinifel.geometry.orientations import grid_spacing, orientation_grid, random_quaternions
from spinifel.io.dataset import inspect_dataset, read_geometry, read_shard, shard_bounds
from spinifel.matching import match_distributed, match_orientations, refine_orientations
from spinifel.merging.merge import accumulate_normal_equations, ball_support, merge
from spinifel.parallel.collectives import allreduce_sum, bcast_array
from spinifel.parallel.context import ParallelContext, collective, on_root
from spinifel.phasing.algorithms import intensity_from_autocorrelation
from spinifel.slicing import Slicer

log = logging.getLogger("spinifel")


@dataclass
class RunState:
    """What one generation hands to the next (identical on every rank)."""

    generation: int = -1
    merged_ac: np.ndarray | None = None
    phased_ac: np.ndarray | None = None
    density: np.ndarray | None = None
    support: np.ndarray | None = None


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


def matching_resolution(generation: int, a) -> float:
    """Fraction of the largest ``|s|`` used for matching in ``generation`` (>= 1)."""
    if a.match_resolution_ramp <= 1:
        return 1.0
    t = (generation - 1) / (a.match_resolution_ramp - 1)
    return float(min(1.0, a.match_resolution_start + (1.0 - a.match_resolution_start) * t))


def model_scale(model_ac: np.ndarray, data_ac: np.ndarray, fourier_mask: np.ndarray) -> float:
    """Least-squares factor ``c`` minimising ``||c I_model - I_data||`` over ``fourier_mask``."""
    k = np.fft.ifftshift(fourier_mask)
    im = np.fft.fftn(np.fft.ifftshift(model_ac)).real[k]
    idata = np.fft.fftn(np.fft.ifftshift(data_ac)).real[k]
    den = float(np.dot(im, im))
    return float(np.dot(im, idata) / den) if den > 0 else 1.0


def _phase_on_root(cfg: Config, ac: np.ndarray, state: RunState, generation: int,
                   fourier_mask: np.ndarray | None):
    from spinifel.phasing.phase import phase

    a = cfg.algorithm
    rng = np.random.default_rng([cfg.runtime.seed, generation, 17])
    return phase(ac, n_loops=a.n_phase_loops, n_er=a.n_er, n_hio=a.n_hio, beta=a.hio_beta,
                 sw_sigma=a.shrinkwrap_sigma, sw_threshold=a.shrinkwrap_threshold,
                 n_final_er=a.n_final_er, rng=rng, rho0=state.density, support0=state.support,
                 fourier_mask=fourier_mask)


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (tests only; off unless the variable is set)."""


FAULT_VARIABLE = "SPINIFEL_FAULT_AFTER_GENERATION"


def _maybe_inject_fault(generation: int, rank: int) -> None:
    """Fault injection for tests: ``SPINIFEL_FAULT_AFTER_GENERATION=G[:RANK[:kill]]``.

    After generation ``G`` (its checkpoint written), rank ``RANK`` (default 0) raises
    :class:`InjectedFault`, or with ``kill`` dies at once with SIGKILL.
    """
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != generation or (len(parts) > 1 and int(parts[1]) != rank):
        return
    if len(parts) > 2 and parts[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault after generation {generation} on rank {rank}")


def run_pipeline(cfg: Config, ctx: ParallelContext, *, overwrite: bool = False,
                 dry_run: bool = False, resume: bool = False) -> dict:
    """Reconstruct the dataset named in ``cfg`` (collective over ``ctx.comm``).

    Returns
    -------
    dict
        On every rank: ``{"generations": n, "out_dir": str, "final": metrics of the last
        generation}``; rank 0 has written ``OUT/result.h5``, MRC files and ``metrics.json``.
    """
    from spinifel.io import output

    comm = ctx.comm
    rank, size = ctx.rank, ctx.size
    a = cfg.algorithm
    threads = cfg.runtime.threads_per_rank
    real = np.float32 if cfg.runtime.precision == "single" else np.float64
    path = cfg.data.path
    if not path:
        raise SpinifelError("config key 'data.path': no dataset given (set it in the config or "
                            "with --set data.path=FILE)")

    _select_backends(cfg)
    t_io = time.perf_counter()
    info = collective(comm, inspect_dataset, path)
    n_images = info.n_images if cfg.data.n_images == 0 else min(cfg.data.n_images, info.n_images)
    start, stop = collective(comm, shard_bounds, n_images, size, rank)
    geom = collective(comm, read_geometry, path, cfg.detector.clip, cfg.detector.binning)
    if a.use_true_orientations and not info.has_orientations:
        raise DatasetError(path, "orientations", "algorithm.use_true_orientations is set but the "
                           "dataset has no orientations")
    mem_est = _memory_estimate(cfg, stop - start, int(geom.mask.sum()))
    if dry_run:
        plan = {"ranks": size, "n_images": n_images, "images_per_rank": _all(comm, stop - start),
                "pixels": int(geom.mask.sum()), "memory_per_rank_bytes": mem_est}
        return plan
    out_dir = on_root(comm, output.prepare_output_dir, cfg.output.dir, overwrite=overwrite,
                      resume=resume)
    shard = collective(comm, read_shard, path, start, stop, cfg.detector.clip, cfg.detector.binning,
                       cfg.data.negative, geom)
    t_io = time.perf_counter() - t_io

    good = geom.mask
    positions = np.ascontiguousarray(geom.positions[:, good])
    images = np.ascontiguousarray(shard.images[:, good], dtype=real)
    extent = geom.reciprocal_extent
    M = a.M
    voxel_m = 1.0 / (2.0 * extent)
    voxel_A = voxel_m * 1e10
    extent_invA = extent * 1e-10
    log.info("data: %d images on %d ranks (%d..%d per rank), %d good pixels of %d; "
             "resolution at the detector corner %.2f A; grid M=%d, voxel %.2f A",
             n_images, size, min(_all(comm, stop - start)), max(_all(comm, stop - start)),
             int(good.sum()), good.size, 1.0 / extent_invA, M, voxel_A)
    log.info("memory estimate per rank: %.1f MiB", mem_est / 2**20)

    grid = orientation_grid(a.n_orientations)
    spacing_deg = math.degrees(grid_spacing(a.n_orientations))
    support = ball_support(M, a.ac_support_radius)
    fmask = measured_fourier_mask(M, positions, extent)
    s_norm = np.linalg.norm(positions, axis=0)
    truth = None
    if cfg.evaluation.enabled and rank == 0 and info.has_ground_truth:
        from spinifel.evaluate.report import load_ground_truth

        truth = load_ground_truth(path, M, extent)
    if a.use_true_orientations:
        quats = np.asarray(shard.orientations, dtype=np.float64).reshape(-1, 4)
        log.info("using the dataset's true orientations (validation mode): no matching")
    else:
        rng0 = np.random.default_rng([cfg.runtime.seed, 0, 3])
        quats = random_quaternions(n_images, rng0)[start:stop]

    from spinifel.io import checkpoint

    fp = checkpoint.fingerprint(cfg, n_images, geom.shape)
    state = RunState()
    metrics: list[dict] = []
    zeros = np.zeros((M, M, M))
    prev_index = None
    first = 0
    if resume:
        if rank == 0:
            # temporaries of a run killed mid-write (never under a final name)
            for stale in Path(out_dir).glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
        ck = on_root(comm, checkpoint.read_checkpoint, out_dir, fp)
        first = ck["generation"] + 1
        state = RunState(generation=ck["generation"], merged_ac=ck["merged_ac"],
                         phased_ac=ck["phased_ac"], density=ck["density"],
                         support=ck["support"].astype(bool))
        quats = ck["orientations"][start:stop]
        if ck["match_index"] is not None:
            prev_index = ck["match_index"][start:stop]
        if first >= a.generations:
            raise SpinifelError(f"{out_dir}: nothing to do, the checkpoint is already at the "
                                f"last generation ({a.generations})")
        old = on_root(comm, _read_metrics, out_dir)
        metrics = [m for m in old if m.get("generation", -1) < first]
        log.info("resuming from %s after generation %d", Path(out_dir) / checkpoint.NAME, first - 1)
    t_run = time.perf_counter()
    final_eval = None
    for g in range(first, a.generations):
        timings: dict[str, float] = {}
        changed = float("nan")
        if g > 0 and not a.use_true_orientations:
            t = time.perf_counter()
            sel = s_norm <= matching_resolution(g, a) * s_norm.max()
            m_images = images if sel.all() else np.ascontiguousarray(images[:, sel])
            slicer = Slicer(state.phased_ac, positions[:, sel], extent, a.nufft_eps_slicing, real,
                            threads)
            if a.matching_mode == "distributed":
                match = match_distributed(comm, m_images, slicer, grid, a.orientation_batch,
                                          a.scale_per_image, a.image_batch, a.match_transform,
                                          timings)
            elif a.search == "coarse_to_fine":
                from spinifel.coarse_to_fine import match_with_config

                match, c2f = match_with_config(m_images, state.phased_ac, positions[:, sel], extent,
                                               slicer, a, real, threads, timings)
                log.info("coarse-to-fine search: %d distance evaluations, %.1fx fewer than "
                         "exhaustive", c2f.evaluations, c2f.reduction)
            else:
                match = match_orientations(m_images, _timed_batches(slicer, grid, a.orientation_batch, timings),
                                           a.scale_per_image, a.image_batch, a.match_transform)
            timings["matching"] = time.perf_counter() - t - timings.get("slicing", 0.0)
            quats = grid[match.best_index]
            if a.refine_rounds > 0 and g >= a.generations - a.refine_generations:
                t = time.perf_counter()
                quats, _ = refine_orientations(m_images, quats, slicer, 0.5 * grid_spacing(a.n_orientations),
                                               a.refine_rounds, a.scale_per_image,
                                               transform=a.match_transform)
                timings["refinement"] = time.perf_counter() - t
            if prev_index is not None:
                n_changed = np.array([float(np.count_nonzero(match.best_index != prev_index))])
                changed = float(allreduce_sum(comm, n_changed)[0]) / n_images
            prev_index = match.best_index
        eq = accumulate_normal_equations(comm, images, quats, positions, extent, M, None,
                                         a.nufft_eps_merge, threads, a.image_batch, timings)
        x0 = zeros if state.phased_ac is None else state.phased_ac
        x_init = x0 if state.merged_ac is None else state.merged_ac
        res = merge(comm, eq, lambdas_rel=a.lambdas, x0=x0, x_init=x_init, support=support,
                    max_iter=a.cg_max_iter, tol=a.cg_tol, nthreads=threads, timings=timings)
        t = time.perf_counter()
        ph = _phase_on_root(cfg, res.autocorrelation, state, g, fmask) if rank == 0 else None
        density = bcast_array(comm, None if ph is None else np.asarray(ph.density, dtype=np.float64))
        dsupport = bcast_array(comm, None if ph is None else np.asarray(ph.support, dtype=bool))
        phased = bcast_array(comm, None if ph is None else np.asarray(ph.autocorrelation, dtype=np.float64))
        # Positivity and the support remove some power: put the phased model back on the
        # data's scale (least squares over the measured shell) so that matching compares
        # like with like; a model that is globally too bright or too dim biases the
        # Euclidean distance towards dim or bright orientations.
        phased *= model_scale(phased, res.autocorrelation, fmask)
        timings["phasing"] = time.perf_counter() - t
        density_change = float("nan")
        if state.density is not None:
            den = np.linalg.norm(state.density)
            density_change = float(np.linalg.norm(density - state.density) / den) if den > 0 else float("nan")
        state = RunState(generation=g, merged_ac=res.autocorrelation, phased_ac=phased,
                         density=density, support=dsupport)
        # Orientations of all images in file order on rank 0 (rank blocks are in file order).
        all_q = comm.gather(quats, root=0) if size > 1 else [quats]
        entry = {"generation": g, "timings": timings,
                 "cg_iterations": res.cg_iterations[res.index], "lambda": res.lam,
                 "lambda_rel": res.lam_rel, "lcurve": {"lambdas_rel": res.lambdas_rel,
                                                      "residual_norms": res.residual_norms,
                                                      "solution_norms": res.solution_norms},
                 "orientation_change": changed, "density_change": density_change,
                 "fourier_error": None if ph is None else float(ph.fourier_error)}
        if rank == 0:
            orientations = np.concatenate(all_q, axis=0)
            intensity = intensity_from_autocorrelation(res.autocorrelation)
            if truth is not None:
                t = time.perf_counter()
                from spinifel.evaluate.report import evaluate_arrays

                try:
                    ev = evaluate_arrays(density=density, intensity=intensity,
                                         orientations=orientations, voxel_size_angstrom=voxel_A,
                                         truth=truth, grid_spacing_deg=spacing_deg)
                except (ValueError, SpinifelError) as e:
                    # Evaluation informs; it never stops a reconstruction.
                    log.warning("evaluation against the ground truth skipped: %s", e)
                    truth = None
                else:
                    entry["evaluation"] = _summary(ev)
                    final_eval = ev
                timings["evaluation"] = time.perf_counter() - t
            last = g == a.generations - 1
            if last or (g + 1) % cfg.output.write_every == 0:
                t = time.perf_counter()
                output.write_result(out_dir, density=density.astype(np.float32),
                                    intensity=intensity.astype(np.float32),
                                    autocorrelation=res.autocorrelation.astype(np.float32),
                                    support=dsupport.astype(np.uint8), orientations=orientations,
                                    voxel_size_angstrom=voxel_A, reciprocal_extent_inv_angstrom=extent_invA,
                                    generation=g, n_ranks=size, config_toml=cfg.to_toml(),
                                    write_mrc=cfg.output.mrc)
                timings["output"] = time.perf_counter() - t
        timings["io_read"] = t_io if g == 0 else 0.0
        # Peak resident memory of every rank so far (MiB): flat over generations = no leak.
        entry["peak_rss_mib"] = _all(comm, _peak_rss_mib())
        metrics.append(entry)
        if rank == 0:
            output.write_metrics(out_dir, {"generations": metrics, "n_ranks": size,
                                           "n_images": n_images, "M": M,
                                           "voxel_size_angstrom": voxel_A,
                                           "n_orientations": a.n_orientations,
                                           "grid_spacing_deg": spacing_deg})
        all_idx = None
        if prev_index is not None:
            all_idx = comm.gather(prev_index, root=0) if size > 1 else [prev_index]
        if rank == 0:
            checkpoint.write_checkpoint(
                out_dir, generation=g, fingerprint=fp, config_toml=cfg.to_toml(),
                merged_ac=res.autocorrelation, phased_ac=phased, density=density,
                support=dsupport.astype(np.uint8), orientations=orientations,
                match_index=None if all_idx is None else np.concatenate(all_idx))
        _maybe_inject_fault(g, rank)
        _log_generation(g, a.generations, entry, time.perf_counter() - t_run)
        if g > 0 and a.orientation_change_tol > 0 and a.density_change_tol > 0:
            if changed < a.orientation_change_tol and density_change < a.density_change_tol:
                log.info("converged: %.4f of images changed orientation, density changed %.4f",
                         changed, density_change)
                break
    out = {"generations": len(metrics), "out_dir": str(out_dir), "final": metrics[-1]}
    if final_eval is not None:
        out["evaluation"] = _summary(final_eval)
    return out


def _select_backends(cfg: Config) -> str:
    """Log the array and NUFFT backends of this run; refuse what this version cannot do.

    This version has the CPU path only: ``runtime.backend = "cupy"`` is an error rather than
    a silent fall-back, and ``"auto"`` means numpy (logged with the reason).
    """
    from spinifel.backend.nufft import available_backends

    if cfg.runtime.backend == "cupy":
        raise ConfigError("config key 'runtime.backend': 'cupy' is not available in this version "
                          "(CPU path only); use 'auto' or 'numpy'")
    nufft, skipped = available_backends(cfg.runtime.nufft_backends, want_gpu=False)
    log.info("array backend numpy (%s); NUFFT backend %s%s",
             "runtime.backend = auto: the GPU path is not in this version"
             if cfg.runtime.backend == "auto" else "runtime.backend = numpy", nufft,
             "".join(f"; skipped {k}: {v}" for k, v in skipped.items()))
    return nufft


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def _read_metrics(out_dir: Any) -> list:
    import json

    p = Path(out_dir) / "metrics.json"
    if not p.is_file():
        return []
    try:
        return list(json.loads(p.read_text()).get("generations", []))
    except (ValueError, OSError):
        return []


def _all(comm: Any, value: int) -> list[int]:
    return comm.allgather(value) if comm.Get_size() > 1 else [value]


def _timed_batches(slicer: Slicer, grid: np.ndarray, batch: int, timings: dict):
    """Slice batches for matching, accumulating the slicing time separately."""
    for start in range(0, len(grid), batch):
        t = time.perf_counter()
        s = slicer.slices(grid[start:start + batch])
        timings["slicing"] = timings.get("slicing", 0.0) + time.perf_counter() - t
        yield start, s


def _summary(ev: dict) -> dict:
    keep = ("density_correlation", "density_hand", "fsc_resolution_0p5_angstrom",
            "fsc_resolution_0p143_angstrom", "intensity_correlation", "orientation_error_deg")
    return {k: ev[k] for k in keep if k in ev}


def _log_generation(g: int, n: int, entry: dict, elapsed: float) -> None:
    t = entry["timings"]
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if v)
    eta = elapsed / (g + 1) * (n - g - 1)
    msg = (f"generation {g + 1}/{n}: lambda_rel {entry['lambda_rel']:.3g}, CG {entry['cg_iterations']} it, "
           f"orientation change {entry['orientation_change']:.3f}; {stages}; ETA {eta:.0f}s")
    ev = entry.get("evaluation")
    if ev:
        msg += (f"; truth: correlation {ev.get('density_correlation', float('nan')):.3f}, "
                f"FSC0.5 {ev.get('fsc_resolution_0p5_angstrom', float('nan')):.1f} A")
        oe = ev.get("orientation_error_deg")
        if isinstance(oe, dict) and "median" in oe:
            msg += f", median orientation error {oe['median']:.1f} deg"
    log.info(msg)


def _memory_estimate(cfg: Config, n_local: int, n_pixels: int) -> int:
    """Rough peak bytes per rank: images, one slice batch and its GEMM block, grids."""
    a = cfg.algorithm
    item = 4 if cfg.runtime.precision == "single" else 8
    images = n_local * n_pixels * item
    slices = a.orientation_batch * n_pixels * (item + 8 * 3 + 8)
    gemm = min(a.image_batch, max(n_local, 1)) * a.orientation_batch * 8 * 2
    merge_pts = min(a.image_batch, max(n_local, 1)) * n_pixels * 8 * 4
    grids = (2 * a.M) ** 3 * 8 * 4 + a.M ** 3 * 8 * 8
    return int(images + slices + gemm + merge_pts + grids)
