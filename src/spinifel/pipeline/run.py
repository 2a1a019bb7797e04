"""``run_pipeline``: a run composed of a Problem, a SolverState, an MTIPSolver and handlers."""

from __future__ import annotations

import logging
from pathlib import Path

from spinifel.config import Config
from spinifel.errors import SpinifelError
from spinifel.parallel.context import ParallelContext, on_root
from spinifel.pipeline.final import finish
from spinifel.pipeline.handlers import HandlerSet, read_metrics
from spinifel.pipeline.problem import Problem
from spinifel.pipeline.solver import MTIPSolver
from spinifel.pipeline.state import SolverState, remove_stale_temporaries

log = logging.getLogger("spinifel")


def run_pipeline(cfg: Config, ctx: ParallelContext, *, overwrite: bool = False,
                 dry_run: bool = False, resume: bool = False) -> dict:
    """Reconstruct the dataset named in ``cfg`` (collective over ``ctx.comm``).

    Returns
    -------
    dict
        With ``dry_run``: the plan (:meth:`Problem.plan`). Otherwise on every rank:
        ``{"generations": n, "out_dir": str, "final": metrics of the last generation}``;
        rank 0 has written ``OUT/result.h5``, MRC files and ``metrics.json``.
    """
    from spinifel.io import checkpoint, output

    problem = Problem.open(cfg, ctx)
    if dry_run:
        return problem.plan()
    out_dir = on_root(ctx.comm, output.prepare_output_dir, cfg.output.dir, overwrite=overwrite,
                      resume=resume)
    problem.load()
    fp = checkpoint.fingerprint(problem.cfg, problem.n_images, problem.geom.shape,
                               checkpoint.dataset_identity(cfg.data.path, problem.n_images,
                                                           cfg.data.format))
    history: list[dict] = []
    if resume:
        state, history = _resume(problem, out_dir, fp)
    else:
        state = SolverState.initial(problem)
    solver = MTIPSolver(problem, state)
    handlers = HandlerSet.default(problem, out_dir, history, fp)
    solver.evolve(handlers)
    return finish(solver, handlers)


def _resume(problem: Problem, out_dir, fp: str) -> tuple[SolverState, list[dict]]:
    """State and metrics history from ``OUT/checkpoint.h5`` (collective)."""
    from spinifel.io import checkpoint

    comm, a = problem.ctx.comm, problem.cfg.algorithm
    if problem.ctx.rank == 0:
        remove_stale_temporaries(out_dir)
    ck = on_root(comm, checkpoint.read_checkpoint, out_dir, fp)
    state = SolverState.from_checkpoint(ck, problem.start, problem.stop,
                                        with_halves=problem.halves is not None)
    first = state.generation + 1
    if first >= a.generations:
        raise SpinifelError(f"{out_dir}: nothing to do, the checkpoint is already at the "
                            f"last generation ({a.generations})")
    old = on_root(comm, read_metrics, out_dir)
    history = [m for m in old if m.get("generation", -1) < first]
    log.info("resuming from %s after generation %d", Path(out_dir) / checkpoint.NAME, first - 1)
    return state, history
