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

from spinifel.backend.arrays import to_host, to_module
from spinifel.backend.select import Backends, release_memory_pool
from spinifel.config import Config
from spinifel.errors import DatasetError, SpinifelError
from spinifel.geometry.orientations import grid_spacing, orientation_grid, random_quaternions
from spinifel.io.dataset import inspect_dataset, read_geometry, read_shard, shard_bounds
from spinifel.orientation.matching import (
    REFINE_SLICES_PER_ROUND,
    match_distributed,
    match_orientations,
    refine_orientations,
)
from spinifel.merging.merge import (
    accumulate_normal_equations,
    add_normal_equations,
    ball_support,
    merge,
    solve_each,
)
from spinifel.parallel.collectives import allreduce_sum, bcast_array
from spinifel.parallel.context import ParallelContext, collective, on_root
from spinifel.parallel.partition import round_robin
from spinifel.phasing.algorithms import intensity_from_autocorrelation
from spinifel.orientation.slicing import Slicer

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


def _phase(cfg: Config, ac: np.ndarray, state: RunState | None, generation: int,
           fourier_mask: np.ndarray | None, stream: int = 0, xp: Any = np):
    """Phase ``ac`` (warm start from ``state``; a random start when it has no density).

    ``stream`` separates the random starts of the full map (0), the half maps (1, 2) and
    the PRTF runs; seeds never depend on the rank.
    """
    from spinifel.phasing.phase import phase

    a = cfg.algorithm
    seed = [cfg.runtime.seed, generation, 17] + ([stream] if stream else [])
    rng = np.random.default_rng(seed)
    # Phasing runs on the array module xp (on the GPU path, on the device), in float64 like
    # the merge: single precision halves its time but cost 0.016 of density correlation on
    # the demo (0.855 vs 0.871, same orientations), so it is not the default.
    return phase(to_module(ac, xp, np.float64), n_loops=a.n_phase_loops, n_er=a.n_er, n_hio=a.n_hio, beta=a.hio_beta,
                 sw_sigma=a.shrinkwrap_sigma, sw_threshold=a.shrinkwrap_threshold,
                 n_final_er=a.n_final_er, rng=rng,
                 rho0=None if state is None else state.density,
                 support0=None if state is None else state.support,
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

    be = _select_backends(cfg, ctx)
    xp = be.xp
    if xp is not np and a.search == "coarse_to_fine":
        raise ConfigError("config key 'algorithm.search': 'coarse_to_fine' runs on the CPU path "
                          "only in this version; use 'exhaustive' with the GPU backend")
    t_io = time.perf_counter()
    info = collective(comm, inspect_dataset, path, cfg.data.format)
    n_images = info.n_images if cfg.data.n_images == 0 else min(cfg.data.n_images, info.n_images)
    start, stop = collective(comm, shard_bounds, n_images, size, rank)
    geom = collective(comm, read_geometry, path, cfg.detector.clip, cfg.detector.binning,
                      cfg.data.format)
    if a.use_true_orientations and not info.has_orientations:
        raise DatasetError(path, "orientations", "algorithm.use_true_orientations is set but the "
                           "dataset has no orientations")
    mem_est = _memory_estimate(cfg, stop - start, int(geom.mask.sum()))
    if dry_run:
        plan = {"ranks": size, "n_images": n_images, "images_per_rank": _all(comm, stop - start),
                "pixels": int(geom.mask.sum()), "memory_per_rank_bytes": mem_est,
                "array_backend": be.array, "nufft_backend": be.nufft}
        return plan
    out_dir = on_root(comm, output.prepare_output_dir, cfg.output.dir, overwrite=overwrite,
                      resume=resume)
    shard = collective(comm, read_shard, path, start, stop, cfg.detector.clip, cfg.detector.binning,
                       cfg.data.negative, geom, cfg.data.format)
    t_io = time.perf_counter() - t_io
    halves = None
    if cfg.validation.half_sets != "off":
        from spinifel.validation.halves import half_assignment

        if n_images < 4:
            raise ConfigError(f"config key 'validation.half_sets': needs at least 4 images, "
                              f"the run has {n_images}")
        halves = half_assignment(n_images, cfg.runtime.seed)[start:stop]

    good = geom.mask
    positions = np.ascontiguousarray(geom.positions[:, good])
    images = np.ascontiguousarray(shard.images[:, good], dtype=real)
    # GPU path: images and pixel positions go to the device once; batch sizes fit its memory
    images, d_positions = to_module(images, xp), to_module(positions, xp)
    # each half's local rows: a host mask (orientations) and one for the images' module
    half_rows = None if halves is None else [
        (halves == h, to_module(halves == h, xp)) for h in (0, 1)]
    orientation_batch, image_batch = _batches(cfg, be, int(good.sum()))
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
    # Half-set chains (validation.half_sets): each half warm-starts only from itself.
    half_states = [RunState(), RunState()]
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
        if halves is not None and ck.get("half_density") is not None:
            half_states = [RunState(generation=ck["generation"], merged_ac=ck["half_merged_ac"][h],
                                    phased_ac=ck["half_phased_ac"][h],
                                    density=ck["half_density"][h],
                                    support=ck["half_support"][h].astype(bool)) for h in (0, 1)]
        quats = ck["orientations"][start:stop]
        if ck["match_index"] is not None:
            prev_index = ck["match_index"][start:stop]
        if first >= a.generations:
            raise SpinifelError(f"{out_dir}: nothing to do, the checkpoint is already at the "
                                f"last generation ({a.generations})")
        old = on_root(comm, _read_metrics, out_dir)
        metrics = [m for m in old if m.get("generation", -1) < first]
        log.info("resuming from %s after generation %d", Path(out_dir) / checkpoint.NAME, first - 1)
    final_eval = None
    durations: list[tuple[float, float]] = []  # (wall seconds, refinement seconds) per generation
    refine_guess = None  # predicted refinement seconds per generation, before it is measured
    t_gen = time.perf_counter()
    for g in range(first, a.generations):
        timings: dict[str, float] = {}
        changed = float("nan")
        independent = False
        if g > 0 and not a.use_true_orientations:
            sel = s_norm <= matching_resolution(g, a) * s_norm.max()
            d_sel = to_module(sel, xp)
            m_images = images if sel.all() else xp.ascontiguousarray(images[:, d_sel])
            refine = a.refine_rounds > 0 and g >= a.generations - a.refine_generations
            assign = dict(cfg=cfg, comm=comm, positions=d_positions[:, d_sel], extent=extent,
                          grid=grid, real=real, threads=threads,
                          orientation_batch=orientation_batch, image_batch=image_batch,
                          refine=refine, timings=timings)
            independent = (halves is not None and cfg.validation.half_sets == "independent"
                           and g >= a.match_resolution_ramp
                           and half_states[0].phased_ac is not None)
            if independent:
                # Gold standard: each half is matched against its own half map only.
                best = np.empty(len(quats), dtype=np.int64)
                quats = np.empty((len(quats), 4))
                for h, (mine, d_mine) in enumerate(half_rows):
                    best[mine], quats[mine] = _assign_orientations(
                        model_ac=half_states[h].phased_ac, images=m_images[d_mine], **assign)
            else:
                best, quats = _assign_orientations(model_ac=state.phased_ac, images=m_images,
                                                   **assign)
            if prev_index is not None:
                n_changed = np.array([float(np.count_nonzero(best != prev_index))])
                changed = float(allreduce_sum(comm, n_changed)[0]) / n_images
            prev_index = best
            m_images = None  # the slices' memory, before the merge's buffers
            release_memory_pool(xp)
        if halves is None:
            eq = accumulate_normal_equations(comm, images, quats, d_positions, extent, M, None,
                                             a.nufft_eps_merge, threads, image_batch, timings,
                                             cfg.runtime.cuda_aware_mpi)
        else:
            # The full set's equations are the sum of the halves' (same NUFFT work).
            half_eqs = [accumulate_normal_equations(
                comm, images[d_mine], quats[mine], d_positions, extent, M, None,
                a.nufft_eps_merge, threads, image_batch, timings, cfg.runtime.cuda_aware_mpi)
                for mine, d_mine in half_rows]
            eq = add_normal_equations(*half_eqs)
        x0 = zeros if state.phased_ac is None else state.phased_ac
        x_init = x0 if state.merged_ac is None else state.merged_ac
        res = merge(comm, eq, lambdas_rel=a.lambdas, x0=x0, x_init=x_init, support=support,
                    max_iter=a.cg_max_iter, tol=a.cg_tol, nthreads=threads, timings=timings,
                    cuda_aware_mpi=cfg.runtime.cuda_aware_mpi)
        res.autocorrelation = to_host(res.autocorrelation)  # stage boundary: state on the host
        eq = None
        half_merged = None
        if halves is not None:
            t = time.perf_counter()
            hx0 = [zeros if hs.phased_ac is None else hs.phased_ac for hs in half_states]
            half_merged = solve_each(
                comm, half_eqs, lam_rel=res.lam_rel, x0s=hx0,
                x_inits=[x if hs.merged_ac is None else hs.merged_ac
                         for x, hs in zip(hx0, half_states)],
                support=support, max_iter=a.cg_max_iter, tol=a.cg_tol, nthreads=threads)
            half_eqs = None
            timings["half_sets"] = time.perf_counter() - t
        release_memory_pool(xp)
        t = time.perf_counter()
        # Phasing jobs: the full map on rank 0, the half maps (if any) on ranks 1 and 2
        # (modulo the rank count), run concurrently and broadcast from their owners.
        jobs = [(res.autocorrelation, state, 0)]
        if half_merged is not None:
            jobs += [(half_merged[h], half_states[h], h + 1) for h in (0, 1)]
        phased_jobs = []
        for ac_j, st_j, stream in jobs:
            owner = stream % size
            ph = _phase(cfg, ac_j, st_j, g, fmask, stream, xp) if rank == owner else None
            phased_jobs.append(ph)
        outs = []
        for (ac_j, _, stream), ph in zip(jobs, phased_jobs):
            owner = stream % size
            d = bcast_array(comm, None if ph is None else to_module(ph.density, np, np.float64), owner)
            sp = bcast_array(comm, None if ph is None else to_module(ph.support, np, bool), owner)
            pa = bcast_array(comm, None if ph is None else to_module(ph.autocorrelation, np, np.float64), owner)
            # Positivity and the support remove some power: put the phased model back on
            # the data's scale (least squares over the measured shell) so that matching
            # compares like with like; a model that is globally too bright or too dim
            # biases the Euclidean distance towards dim or bright orientations.
            pa *= model_scale(pa, ac_j, fmask)
            err = None if ph is None else float(ph.fourier_error)
            outs.append((d, sp, pa, err))
        density, dsupport, phased, fourier_err = outs[0]
        timings["phasing"] = time.perf_counter() - t
        half_set_summary = None
        if half_merged is not None:
            half_states = [RunState(generation=g, merged_ac=half_merged[h], phased_ac=outs[h + 1][2],
                                    density=outs[h + 1][0], support=outs[h + 1][1]) for h in (0, 1)]
            if rank == 0:
                from spinifel.validation.halves import half_map_fsc

                t = time.perf_counter()
                half_set_summary = half_map_fsc(half_states[0].density, half_states[1].density,
                                                voxel_A)
                half_set_summary["mode"] = "independent" if independent else "shared"
                timings["half_sets"] += time.perf_counter() - t
        density_change = float("nan")
        if state.density is not None:
            den = np.linalg.norm(state.density)
            density_change = float(np.linalg.norm(density - state.density) / den) if den > 0 else float("nan")
        state = RunState(generation=g, merged_ac=res.autocorrelation, phased_ac=phased,
                         density=density, support=dsupport)
        converged = (g > 0 and a.orientation_change_tol > 0 and a.density_change_tol > 0
                     and changed < a.orientation_change_tol
                     and density_change < a.density_change_tol)
        # Orientations of all images in file order on rank 0 (rank blocks are in file order).
        all_q = comm.gather(quats, root=0) if size > 1 else [quats]
        entry = {"generation": g, "timings": timings,
                 "cg_iterations": res.cg_iterations[res.index], "lambda": res.lam,
                 "lambda_rel": res.lam_rel, "lcurve": {"lambdas_rel": res.lambdas_rel,
                                                      "residual_norms": res.residual_norms,
                                                      "solution_norms": res.solution_norms},
                 "orientation_change": changed, "density_change": density_change,
                 "fourier_error": fourier_err}
        if half_set_summary is not None:
            entry["half_set"] = half_set_summary
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
            last = g == a.generations - 1 or converged
            result_kwargs = dict(density=density.astype(np.float32),
                                 intensity=intensity.astype(np.float32),
                                 autocorrelation=res.autocorrelation.astype(np.float32),
                                 support=dsupport.astype(np.uint8), orientations=orientations,
                                 voxel_size_angstrom=voxel_A,
                                 reciprocal_extent_inv_angstrom=extent_invA, generation=g,
                                 n_ranks=size, config_toml=cfg.to_toml(), write_mrc=cfg.output.mrc)
            if last or (g + 1) % cfg.output.write_every == 0:
                t = time.perf_counter()
                output.write_result(out_dir, **result_kwargs)
                timings["output"] = time.perf_counter() - t
        timings["io_read"] = t_io if g == 0 else 0.0
        # Peak resident memory of every rank so far (MiB): flat over generations = no leak.
        entry["peak_rss_mib"] = _all(comm, _peak_rss_mib())
        metrics.append(entry)
        doc = {"generations": metrics, "n_ranks": size, "n_images": n_images, "M": M,
               "voxel_size_angstrom": voxel_A, "n_orientations": a.n_orientations,
               "grid_spacing_deg": spacing_deg, "n_generations": a.generations}
        if rank == 0:
            output.write_metrics(out_dir, doc)
            _draw_progress(cfg, out_dir, doc)
        all_idx = None
        if prev_index is not None:
            all_idx = comm.gather(prev_index, root=0) if size > 1 else [prev_index]
        if rank == 0:
            checkpoint.write_checkpoint(
                out_dir, generation=g, fingerprint=fp, config_toml=cfg.to_toml(),
                merged_ac=res.autocorrelation, phased_ac=phased, density=density,
                support=dsupport.astype(np.uint8), orientations=orientations,
                match_index=None if all_idx is None else np.concatenate(all_idx),
                **_half_arrays(half_states if halves is not None else None))
        _maybe_inject_fault(g, rank)
        now = time.perf_counter()
        durations.append((now - t_gen, timings.get("refinement", 0.0)))
        t_gen = now
        refine_start = a.generations - a.refine_generations if a.refine_rounds > 0 else a.generations
        if timings.get("slicing"):
            # Refinement not measured yet: predict it from this generation's slicing rate
            # (its cost is slices per image x images, at the same points per slice).
            # (in the independent half-set mode two models were sliced and refined against)
            sliced = len(grid) * (2 if independent else 1)
            per_slice = timings["slicing"] / (sliced / (size if a.matching_mode == "distributed" else 1))
            per_image = REFINE_SLICES_PER_ROUND[a.refine_stencil] * a.refine_rounds
            refine_guess = per_slice * per_image * len(quats)
        _log_generation(g, a.generations, entry,
                        estimate_remaining(durations, g, a.generations, refine_start, refine_guess))
        if converged:
            log.info("converged: %.4f of images changed orientation, density changed %.4f",
                     changed, density_change)
            break
    if cfg.validation.prtf_runs > 0 and state.merged_ac is not None:
        prtf = _prtf(cfg, comm, state.merged_ac, fmask, voxel_A, state.generation, xp)
        if rank == 0:
            doc["prtf"] = prtf["summary"]
            if cfg.validation.prtf_average:
                avg = prtf["average"]
                result_kwargs["density"] = avg.astype(np.float32)
                output.write_result(out_dir, **result_kwargs)
                if truth is not None:
                    from spinifel.evaluate.report import evaluate_arrays

                    try:
                        final_eval = evaluate_arrays(
                            density=avg, intensity=result_kwargs["intensity"],
                            orientations=result_kwargs["orientations"],
                            voxel_size_angstrom=voxel_A, truth=truth,
                            grid_spacing_deg=spacing_deg)
                        doc["prtf"]["evaluation"] = _summary(final_eval)
                    except (ValueError, SpinifelError) as e:
                        log.warning("evaluation of the PRTF average skipped: %s", e)
            output.write_metrics(out_dir, doc)
            _draw_progress(cfg, out_dir, doc)
        s = prtf["summary"] if rank == 0 else None
        if s is not None:
            log.info("PRTF of %d phasing runs: drops to 1/e at %.2f A%s", s["n_runs"],
                     s["resolution_1_over_e_angstrom"],
                     "; the final density is their aligned average"
                     if cfg.validation.prtf_average else "")
    out = {"generations": len(metrics), "out_dir": str(out_dir), "final": metrics[-1]}
    if final_eval is not None:
        out["evaluation"] = _summary(final_eval)
    return out


def _assign_orientations(*, cfg: Config, comm: Any, model_ac: np.ndarray, images: Any,
                         positions: Any, extent: float, grid: np.ndarray, real: Any,
                         threads: int, orientation_batch: int, image_batch: int, refine: bool,
                         timings: dict) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``model_ac``, match ``images`` on the grid, refine off the grid if asked.

    Collective in the distributed matching mode. Adds to ``timings`` ("slicing",
    "matching", "refinement"). Returns the grid indices ``(n,)`` and the orientations
    ``(n, 4)`` on the host.
    """
    a = cfg.algorithm
    t = time.perf_counter()
    slicing_before = timings.get("slicing", 0.0)
    slicer = Slicer(model_ac, positions, extent, a.nufft_eps_slicing, real, threads)
    if a.matching_mode == "distributed":
        match = match_distributed(comm, images, slicer, grid, orientation_batch,
                                  a.scale_per_image, image_batch, a.match_transform, timings)
    elif a.search == "coarse_to_fine":
        from spinifel.orientation.coarse_to_fine import match_with_config

        match, c2f = match_with_config(images, model_ac, positions, extent, slicer, a, real,
                                       threads, timings)
        log.info("coarse-to-fine search: %d distance evaluations, %.1fx fewer than "
                 "exhaustive", c2f.evaluations, c2f.reduction)
    else:
        match = match_orientations(images, _timed_batches(slicer, grid, orientation_batch, timings),
                                   a.scale_per_image, image_batch, a.match_transform)
    match = match.to(np)  # orientations are bookkept on the host
    timings["matching"] = (timings.get("matching", 0.0) + time.perf_counter() - t
                           - (timings.get("slicing", 0.0) - slicing_before))
    quats = grid[match.best_index]
    if refine:
        t = time.perf_counter()
        quats, _ = refine_orientations(images, quats, slicer, 0.5 * grid_spacing(a.n_orientations),
                                       a.refine_rounds, a.scale_per_image,
                                       transform=a.match_transform, stencil=a.refine_stencil)
        timings["refinement"] = timings.get("refinement", 0.0) + time.perf_counter() - t
    return match.best_index, quats


def _half_arrays(half_states: list | None) -> dict:
    """Checkpoint arrays of the half-set chains (stacked over the two halves)."""
    if half_states is None or half_states[0].density is None:
        return {}
    return {"half_merged_ac": np.stack([h.merged_ac for h in half_states]),
            "half_phased_ac": np.stack([h.phased_ac for h in half_states]),
            "half_density": np.stack([h.density for h in half_states]),
            "half_support": np.stack([h.support for h in half_states]).astype(np.uint8)}


def _draw_progress(cfg: Config, out_dir: Any, doc: dict) -> None:
    """Redraw OUT/progress.png (rank 0); a plotting failure is logged, never fatal."""
    if not cfg.output.progress_png:
        return
    from spinifel.validation.progress import write_progress

    try:
        write_progress(out_dir, doc)
    except Exception as e:  # noqa: BLE001 - a picture must never end a reconstruction
        log.warning("progress.png not updated: %s", str(e).splitlines()[0] if str(e) else e)


PRTF_STREAM = 0x5052


def _prtf(cfg: Config, comm: Any, merged_ac: np.ndarray, fmask: np.ndarray, voxel_A: float,
          generation: int, xp: Any = np) -> dict:
    """Phase ``merged_ac`` ``prtf_runs`` times from random starts, spread over the ranks.

    Run ``j`` runs on rank ``j % size`` with a seed from ``(runtime.seed, j)`` only, so the
    result does not depend on the rank count. Returns on rank 0 ``{"summary": dict,
    "average": ndarray}`` (see :func:`spinifel.validation.prtf.prtf_summary`); ``{}``
    elsewhere.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    k = cfg.validation.prtf_runs
    t = time.perf_counter()
    mine = {}
    for j in round_robin(k, size, rank):
        ph = _phase(cfg, merged_ac, None, PRTF_STREAM, fmask, stream=j + 1, xp=xp)
        mine[j] = to_module(ph.density, np, np.float64)
    parts = comm.gather(mine, root=0) if size > 1 else [mine]
    if rank != 0:
        return {}
    from spinifel.validation.prtf import prtf_summary

    runs: dict[int, np.ndarray] = {}
    for p in parts:
        runs.update(p)
    summary, average = prtf_summary([runs[j] for j in range(k)], voxel_A, fmask)
    summary["seconds"] = time.perf_counter() - t
    summary["generation"] = generation
    return {"summary": summary, "average": average}


def _select_backends(cfg: Config, ctx: ParallelContext) -> Backends:
    """Choose and log the array and NUFFT backends; on a GPU, bind this rank to its device.

    ``runtime.backend = "cupy"`` without a usable GPU is a ConfigError (never a silent
    fall-back); ``"auto"`` takes the GPU when CuPy sees one and cufinufft imports. All
    ranks decide together: if any rank cannot use the GPU under ``auto``, all use numpy.
    """
    from spinifel.backend.select import bind_device, select_backends

    be = collective(ctx.comm, select_backends, cfg.runtime.backend, cfg.runtime.nufft_backends)
    if ctx.size > 1 and not all(ctx.comm.allgather(be.gpu)):
        be = select_backends("numpy", cfg.runtime.nufft_backends)
        be = Backends(be.array, be.xp, be.nufft, "runtime.backend = auto: not every rank sees a "
                      "GPU", be.skipped)
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


def estimate_remaining(durations: list[tuple[float, float]], g: int, n: int,
                       refine_start: int, refine_guess: float | None = None
                       ) -> tuple[float, bool]:
    """Seconds left after generation ``g`` of ``n``, from this run's recent generations.

    ``durations`` holds ``(wall, refinement)`` seconds of the generations run so far. The
    base cost of a generation is the mean of the last two without refinement; each
    remaining generation at or after ``refine_start`` adds the last measured refinement
    time, or ``refine_guess`` before one is measured. Returns ``(seconds, complete)``;
    ``complete`` is False when refinement generations remain with neither (the estimate
    leaves them out).
    """
    recent = durations[-2:]
    base = sum(w - r for w, r in recent) / len(recent)
    refine = next((r for _, r in reversed(durations) if r > 0), refine_guess)
    left = range(g + 1, n)
    n_refine = sum(1 for k in left if k >= refine_start)
    eta = base * len(left) + (refine or 0.0) * n_refine
    return eta, not (n_refine and refine is None)


def _log_generation(g: int, n: int, entry: dict, eta: tuple[float, bool]) -> None:
    t = entry["timings"]
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if v)
    eta_s = f"{eta[0]:.0f}s" + ("" if eta[1] else " + refinement")
    msg = (f"generation {g + 1}/{n}: lambda_rel {entry['lambda_rel']:.3g}, CG {entry['cg_iterations']} it, "
           f"orientation change {entry['orientation_change']:.3f}; {stages}; ETA {eta_s}")
    hs = entry.get("half_set")
    if hs:
        msg += f"; half-set FSC0.143 {hs['resolution_0p143_angstrom']:.1f} A"
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
    if a.search == "coarse_to_fine":
        # the fine pass holds the fine slices its candidates need: with many images up to
        # the whole fine grid, capped by coarse_max_fine_slices
        held = a.n_orientations if a.coarse_max_fine_slices == 0 else min(
            a.n_orientations, a.coarse_max_fine_slices)
        slices += held * n_pixels * item
    return int(images + slices + gemm + merge_pts + grids)
