"""Handlers called after each generation on every rank: ``handler(solver, report)``.

Each does one thing; those writing files do it on rank 0, those needing every rank's data
call a collective (so every rank calls every handler, in the same order):

* :class:`Evaluation`: comparison with the ground truth (rank 0, when the dataset has it);
* :class:`ResultWriter`: ``result.h5`` and MRC files on the ``output.write_every`` cadence;
* :class:`MetricsWriter`: ``metrics.json`` and ``progress.png`` (peak RSS: allgather);
* :class:`CheckpointWriter`: ``checkpoint.h5`` (match indices: gather);
* :class:`FaultInjector`: test hook, only when ``SPINIFEL_FAULT_AFTER_GENERATION`` is set;
* :class:`ProgressLog`: the generation's log line with the ETA.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinifel.errors import SpinifelError
from spinifel.evaluate.fsc import describe_resolution
from spinifel.orientation.matching import REFINE_SLICES_PER_ROUND
from spinifel.parallel.collectives import allgather_objects, gather_objects
from spinifel.pipeline.problem import Problem
from spinifel.pipeline.solver import MTIPSolver, StepReport
from spinifel.pipeline.timer import StageTimer

log = logging.getLogger("spinifel")

FAULT_VARIABLE = "SPINIFEL_FAULT_AFTER_GENERATION"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (tests only; off unless the variable is set)."""


def summary(ev: dict) -> dict:
    """The headline numbers of an evaluation (``metrics.json`` and the run's summary)."""
    fsc_keys = tuple(f"fsc_resolution_{t}_{k}" for t in ("0p5", "0p143")
                     for k in ("angstrom", "reached", "status", "better_than_angstrom"))
    keep = ("density_correlation", "density_hand", *fsc_keys, "intensity_correlation",
            "orientation_error_deg")
    return {k: ev[k] for k in keep if k in ev}


class Evaluation:
    """Evaluate each generation against the ground truth (rank 0 only).

    A failure is logged once and turns evaluation off: it informs, never stops a run.
    ``last`` holds the full evaluation of the latest generation (rank 0) or None.
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.truth = problem.truth
        self.last: dict | None = None

    def __call__(self, solver: MTIPSolver, report: StepReport) -> None:
        if self.truth is None:
            return
        from spinifel.evaluate.report import evaluate_arrays

        p = self.problem
        with StageTimer(report.timings, "evaluation"):
            try:
                ev = evaluate_arrays(density=solver.state.full.density,
                                     intensity=report.intensity, orientations=report.orientations,
                                     voxel_size_angstrom=p.voxel_angstrom, truth=self.truth,
                                     grid_spacing_deg=p.grid_spacing_deg)
            except (ValueError, SpinifelError) as e:
                log.warning("evaluation against the ground truth skipped: %s", e)
                self.truth = None
            else:
                report.entry["evaluation"] = summary(ev)
                self.last = ev


class ResultWriter:
    """``OUT/result.h5`` (+ MRC) on rank 0 every ``output.write_every`` generations and at
    the last one; ``kwargs`` keeps the latest generation's arrays (the PRTF step reuses them)."""

    def __init__(self, problem: Problem, out_dir: Any) -> None:
        self.problem = problem
        self.out_dir = out_dir
        self.kwargs: dict | None = None

    def __call__(self, solver: MTIPSolver, report: StepReport) -> None:
        p = self.problem
        if p.ctx.rank != 0:
            return
        from spinifel.io import output

        full, cfg = solver.state.full, p.cfg
        self.kwargs = dict(density=full.density.astype(np.float32),
                           intensity=report.intensity.astype(np.float32),
                           autocorrelation=full.merged_ac.astype(np.float32),
                           support=full.support.astype(np.uint8),
                           orientations=report.orientations, voxel_size_angstrom=p.voxel_angstrom,
                           reciprocal_extent_inv_angstrom=p.extent_inv_angstrom,
                           generation=report.generation, n_ranks=p.ctx.size,
                           config_toml=cfg.to_toml(), write_mrc=cfg.output.mrc)
        if report.last or (report.generation + 1) % cfg.output.write_every == 0:
            with StageTimer(report.timings, "output"):
                output.write_result(self.out_dir, **self.kwargs)


class MetricsWriter:
    """Append the generation's entry to ``metrics.json`` and redraw ``progress.png``.

    ``history`` holds the entries of earlier generations (a resumed run's); ``doc`` is the
    whole document last written. The peak RSS of every rank is an allgather (collective);
    ``doc["memory"]`` puts the run's peak so far next to the memory estimate that
    :func:`spinifel.runtime.check_memory` judged the run by.
    """

    def __init__(self, problem: Problem, out_dir: Any, history: list[dict]) -> None:
        self.problem = problem
        self.out_dir = out_dir
        self.metrics = list(history)
        self.doc: dict = {}
        self.estimate_mib: list[float] | None = None

    def __call__(self, solver: MTIPSolver, report: StepReport) -> None:
        p, a = self.problem, self.problem.cfg.algorithm
        report.timings["io_read"] = p.io_seconds if report.generation == 0 else 0.0
        # Peak resident memory of every rank so far (MiB): flat over generations = no leak.
        report.entry["peak_rss_mib"] = allgather_objects(p.ctx.comm, peak_rss_mib())
        if self.estimate_mib is None:
            self.estimate_mib = allgather_objects(p.ctx.comm, p.memory_estimate() / 2**20)
        self.metrics.append(report.entry)
        self.doc = {"generations": self.metrics, "n_ranks": p.ctx.size,
                    "n_images": p.n_images, "M": a.M, "voxel_size_angstrom": p.voxel_angstrom,
                    "n_orientations": a.n_orientations, "grid_spacing_deg": p.grid_spacing_deg,
                    "n_generations": a.generations,
                    "memory": memory_summary(self.estimate_mib, report.entry["peak_rss_mib"])}
        if p.background_report is not None:  # the background estimated once from the data
            self.doc["background_from_data"] = p.background_report
        self.write()

    def write(self) -> None:
        """Write ``doc`` and redraw the progress plot (rank 0)."""
        if self.problem.ctx.rank != 0:
            return
        from spinifel.io import output

        output.write_metrics(self.out_dir, self.doc)
        draw_progress(self.problem.cfg, self.out_dir, self.doc)


class CheckpointWriter:
    """``OUT/checkpoint.h5`` after every generation (rank 0; indices gathered first)."""

    def __init__(self, problem: Problem, out_dir: Any, fingerprint: str) -> None:
        self.problem = problem
        self.out_dir = out_dir
        self.fingerprint = fingerprint

    def __call__(self, solver: MTIPSolver, report: StepReport) -> None:
        p, st = self.problem, solver.state
        all_idx = None
        if st.match_index is not None:
            all_idx = gather_objects(p.ctx.comm, st.match_index)
        if p.ctx.rank != 0:
            return
        from spinifel.io import checkpoint

        arrays = st.checkpoint_arrays(report.orientations,
                                      None if all_idx is None else np.concatenate(all_idx))
        checkpoint.write_checkpoint(self.out_dir, generation=report.generation,
                                    fingerprint=self.fingerprint, config_toml=p.cfg.to_toml(),
                                    **arrays)


class FaultInjector:
    """Fault injection for tests: ``SPINIFEL_FAULT_AFTER_GENERATION=G[:RANK[:kill]]``.

    After generation ``G`` (its checkpoint written), rank ``RANK`` (default 0) raises
    :class:`InjectedFault`, or with ``kill`` dies at once with SIGKILL.
    """

    def __init__(self, spec: str, rank: int) -> None:
        self.spec = spec
        self.rank = rank

    @classmethod
    def from_environment(cls, rank: int) -> FaultInjector | None:
        """The injector when the variable is set, else None."""
        spec = os.environ.get(FAULT_VARIABLE)
        return cls(spec, rank) if spec else None

    def __call__(self, solver: MTIPSolver, report: StepReport) -> None:
        parts = self.spec.split(":")
        g = report.generation
        if int(parts[0]) != g or (len(parts) > 1 and int(parts[1]) != self.rank):
            return
        if len(parts) > 2 and parts[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault after generation {g} on rank {self.rank}")


class ProgressLog:
    """The log line of each generation with its stage timings and the ETA."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.durations: list[tuple[float, float]] = []  # (wall, refinement) s per generation
        self.refine_guess: float | None = None  # predicted refinement s, before measured
        self.t_last = time.perf_counter()

    def __call__(self, solver: MTIPSolver, report: StepReport) -> None:
        p, a, timings = self.problem, self.problem.cfg.algorithm, report.timings
        now = time.perf_counter()
        self.durations.append((now - self.t_last, timings.get("refinement", 0.0)))
        self.t_last = now
        refine_start = (a.generations - a.refine_generations if a.refine_rounds > 0
                        else a.generations)
        if timings.get("slicing"):
            # Refinement not measured yet: predict it from this generation's slicing rate
            # (its cost is slices per image x images, at the same points per slice).
            # (in the independent half-set mode two models were sliced and refined against)
            sliced = len(p.grid) * (2 if report.assignment.independent else 1)
            share = p.ctx.size if a.matching_mode == "distributed" else 1
            per_slice = timings["slicing"] / (sliced / share)
            per_image = REFINE_SLICES_PER_ROUND[a.refine_stencil] * a.refine_rounds
            self.refine_guess = per_slice * per_image * p.n_local
        eta = estimate_remaining(self.durations, report.generation, a.generations, refine_start,
                                 self.refine_guess)
        log_generation(report.generation, a.generations, report.entry, eta)
        if report.converged:
            log.info("converged: %.4f of images changed orientation, density changed %.4f",
                     report.entry["orientation_change"], report.entry["density_change"])


@dataclass
class HandlerSet:
    """The default handlers of a run, in calling order (iterate to get them)."""

    evaluation: Evaluation
    results: ResultWriter
    metrics: MetricsWriter
    checkpoint: CheckpointWriter
    fault: FaultInjector | None
    progress: ProgressLog

    @classmethod
    def default(cls, problem: Problem, out_dir: Any, history: list[dict],
                fingerprint: str) -> HandlerSet:
        return cls(Evaluation(problem), ResultWriter(problem, out_dir),
                   MetricsWriter(problem, out_dir, history),
                   CheckpointWriter(problem, out_dir, fingerprint),
                   FaultInjector.from_environment(problem.ctx.rank), ProgressLog(problem))

    def __iter__(self):
        return iter([h for h in (self.evaluation, self.results, self.metrics, self.checkpoint,
                                 self.fault, self.progress) if h is not None])


def draw_progress(cfg: Any, out_dir: Any, doc: dict) -> None:
    """Redraw OUT/progress.png (rank 0); a plotting failure is logged, never fatal."""
    if not cfg.output.progress_png:
        return
    from spinifel.validation.progress import write_progress

    try:
        write_progress(out_dir, doc)
    except Exception as e:  # noqa: BLE001 - a picture must never end a reconstruction
        log.warning("progress.png not updated: %s", str(e).splitlines()[0] if str(e) else e)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def memory_summary(estimate_mib: list[float], peak_mib: list[float]) -> dict:
    """The memory estimate next to the measured peak RSS, per rank and their maxima.

    Parameters
    ----------
    estimate_mib, peak_mib : list of float, one per rank (MiB)
        The run's memory estimate of each rank and its peak resident set size so far.

    Returns
    -------
    dict
        ``estimate_per_rank_mib``, ``peak_rss_per_rank_mib``, ``estimate_max_mib``,
        ``peak_rss_max_mib`` and ``peak_over_estimate`` (the largest peak over the largest
        estimate: above 1 the estimate was too low).
    """
    est, peak = max(estimate_mib), max(peak_mib)
    return {"estimate_per_rank_mib": [float(e) for e in estimate_mib],
            "peak_rss_per_rank_mib": [float(v) for v in peak_mib],
            "estimate_max_mib": float(est), "peak_rss_max_mib": float(peak),
            "peak_over_estimate": float(peak / est) if est > 0 else float("nan")}


def read_metrics(out_dir: Any) -> list:
    """The ``generations`` list of an existing ``OUT/metrics.json`` ([] if none/unreadable)."""
    import json

    p = Path(out_dir) / "metrics.json"
    if not p.is_file():
        return []
    try:
        return list(json.loads(p.read_text()).get("generations", []))
    except (ValueError, OSError):
        return []


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


def log_generation(g: int, n: int, entry: dict, eta: tuple[float, bool]) -> None:
    """Log one generation's line: lambda, CG, orientation change, timings, ETA, quality."""
    t = entry["timings"]
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if v)
    eta_s = f"{eta[0]:.0f}s" + ("" if eta[1] else " + refinement")
    msg = (f"generation {g + 1}/{n}: lambda_rel {entry['lambda_rel']:.3g}, CG "
           f"{entry['cg_iterations']} it, orientation change {entry['orientation_change']:.3f}; "
           f"{stages}; ETA {eta_s}")
    post = entry.get("posterior")
    if post:
        from spinifel.pipeline.poisson import posterior_log_text

        msg += "; " + posterior_log_text(post)
    hs = entry.get("half_set")
    if hs:
        msg += f"; half-set FSC0.143 {describe_resolution(hs, 'resolution_0p143')}"
    ev = entry.get("evaluation")
    if ev:
        msg += (f"; truth: correlation {ev.get('density_correlation', float('nan')):.3f}, "
                f"FSC0.5 {describe_resolution(ev, 'fsc_resolution_0p5')}")
        oe = ev.get("orientation_error_deg")
        if isinstance(oe, dict) and "median" in oe:
            msg += f", median orientation error {oe['median']:.1f} deg"
    log.info(msg)
