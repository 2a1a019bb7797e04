"""The M-TIP reconstruction as a solver with stages and handlers (see docs/architecture.md).

* :mod:`~spinifel.pipeline.problem`: :class:`Problem`, built once (backends, shard,
  geometry, grid, support, Fourier mask, half sets, batches, truth); the dry run's plan.
* :mod:`~spinifel.pipeline.state`: :class:`SolverState` / :class:`ChainState`, what one
  generation hands to the next and what a checkpoint stores.
* :mod:`~spinifel.pipeline.solver`: :class:`MTIPSolver`, ``step()`` = ``orient()``,
  ``merge()``, ``phase()``, ``advance()``; ``proceed`` / ``evolve()``.
* :mod:`~spinifel.pipeline.handlers`: what runs after each step (evaluation, results,
  metrics, checkpoint, fault injection, log line with ETA).
* :mod:`~spinifel.pipeline.final`: the PRTF and the run's summary.
* :mod:`~spinifel.pipeline.run`: :func:`run_pipeline`, composing them.
"""

from spinifel.phasing.algorithms import intensity_from_autocorrelation
from spinifel.pipeline.handlers import (
    FAULT_VARIABLE,
    HandlerSet,
    InjectedFault,
    estimate_remaining,
    peak_rss_mib,
)
from spinifel.pipeline.problem import Problem, _memory_estimate, measured_fourier_mask
from spinifel.pipeline.run import run_pipeline
from spinifel.pipeline.solver import (
    Assignment,
    MTIPSolver,
    StepReport,
    matching_resolution,
    model_scale,
)
from spinifel.pipeline.state import ChainState, SolverState
from spinifel.pipeline.timer import StageTimer

__all__ = ["FAULT_VARIABLE", "Assignment", "ChainState", "HandlerSet", "InjectedFault",
           "MTIPSolver", "Problem", "SolverState", "StageTimer", "StepReport",
           "_memory_estimate", "estimate_remaining", "intensity_from_autocorrelation",
           "matching_resolution", "measured_fourier_mask", "model_scale", "peak_rss_mib",
           "run_pipeline"]
