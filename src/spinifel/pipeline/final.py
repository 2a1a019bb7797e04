"""The run's final step, after the last generation: the PRTF and the run's summary."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from spinifel.backend.arrays import to_module
from spinifel.config import Config
from spinifel.errors import SpinifelError
from spinifel.evaluate.fsc import format_resolution
from spinifel.parallel.collectives import gather_objects
from spinifel.parallel.partition import round_robin
from spinifel.pipeline.handlers import HandlerSet, summary
from spinifel.pipeline.solver import MTIPSolver, phase_chain

log = logging.getLogger("spinifel")

PRTF_STREAM = 0x5052


def prtf(cfg: Config, comm: Any, merged_ac: np.ndarray, fmask: np.ndarray, voxel_A: float,
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
        ph = phase_chain(cfg, merged_ac, None, PRTF_STREAM, fmask, stream=j + 1, xp=xp)
        mine[j] = to_module(ph.density, np, np.float64)
    parts = gather_objects(comm, mine)
    if rank != 0:
        return {}
    from spinifel.validation.prtf import prtf_summary

    runs: dict[int, np.ndarray] = {}
    for p in parts:
        runs.update(p)
    summary_, average = prtf_summary([runs[j] for j in range(k)], voxel_A, fmask)
    summary_["seconds"] = time.perf_counter() - t
    summary_["generation"] = generation
    return {"summary": summary_, "average": average}


def finish(solver: MTIPSolver, handlers: HandlerSet) -> dict:
    """PRTF (``validation.prtf_runs``; collective) and the run's summary.

    With ``validation.prtf_average`` the aligned average of the PRTF runs replaces the
    final density in ``result.h5`` (and is evaluated when the truth is known).

    Returns
    -------
    dict
        On every rank: ``{"generations": n, "out_dir": str, "final": metrics of the last
        generation}``, plus ``"evaluation"`` (rank 0, when evaluated).
    """
    p, cfg, st = solver.problem, solver.cfg, solver.state
    metrics = handlers.metrics
    final_eval = handlers.evaluation.last
    if cfg.validation.prtf_runs > 0 and st.full.merged_ac is not None:
        res = prtf(cfg, p.ctx.comm, st.full.merged_ac, p.fourier_mask, p.voxel_angstrom,
                   st.generation, p.xp)
        if p.ctx.rank == 0:
            final_eval = _record_prtf(res, solver, handlers) or final_eval
            s = res["summary"]
            log.info("PRTF of %d phasing runs: drops below its random-phase floor at %s%s",
                     s["n_runs"], format_resolution(s["resolution_angstrom"], s["status"],
                                                    s["better_than_angstrom"]),
                     "; the final density is their aligned average"
                     if cfg.validation.prtf_average else "")
    out = {"generations": len(metrics.metrics), "out_dir": str(metrics.out_dir),
           "final": metrics.metrics[-1]}
    if final_eval is not None:
        out["evaluation"] = summary(final_eval)
    return out


def _record_prtf(res: dict, solver: MTIPSolver, handlers: HandlerSet) -> dict | None:
    """Rank 0: PRTF summary into metrics.json; with ``prtf_average`` the average into
    result.h5 and its evaluation. Returns that evaluation or None."""
    p, cfg = solver.problem, solver.cfg
    doc, final_eval = handlers.metrics.doc, None
    doc["prtf"] = res["summary"]
    if cfg.validation.prtf_average:
        from spinifel.io import output

        kwargs = handlers.results.kwargs
        avg = res["average"]
        kwargs["density"] = avg.astype(np.float32)
        output.write_result(handlers.results.out_dir, **kwargs)
        if handlers.evaluation.truth is not None:
            from spinifel.evaluate.report import evaluate_arrays

            try:
                final_eval = evaluate_arrays(
                    density=avg, intensity=kwargs["intensity"],
                    orientations=kwargs["orientations"], voxel_size_angstrom=p.voxel_angstrom,
                    truth=handlers.evaluation.truth, grid_spacing_deg=p.grid_spacing_deg)
                doc["prtf"]["evaluation"] = summary(final_eval)
            except (ValueError, SpinifelError) as e:
                log.warning("evaluation of the PRTF average skipped: %s", e)
    handlers.metrics.write()
    return final_eval
