"""The global merge: Tikhonov-regularised least squares for the autocorrelation.

Solves ``(N + lam I) x = r + lam x0`` on the ``M^3`` grid restricted to the
autocorrelation support, with ``N = Re(A* D A)`` (Toeplitz, :mod:`.operator`) and
``r = Re(A* D b)``. Both are type-1 NUFFTs of each rank's own images, summed over all
ranks with ``Allreduce`` (the summation order, and so the round-off, depends on the rank
count). The list of regularisation values is fixed by the config; rank 0 solves the whole
sweep at the cost of one solve (multi-shift CG, :func:`solve_sweep`), chooses the L-curve
corner and broadcasts it.

The only MPI this module sees is the communicator passed in, through
:mod:`spinifel.parallel.collectives`.

Arrays follow the module of the images (numpy, or cupy on a GPU: NUFFTs, the Toeplitz
FFTs and CG then stay on the device; only the Allreduce buffers and a few scalars per
solve cross to the host, see ``cuda_aware_mpi``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spinifel.backend.arrays import get_array_module, to_host, to_module
from spinifel.backend.nufft import Type1
from spinifel.geometry.points import rotated_points
from spinifel.merging.cg import conjugate_gradient, multishift_cg
from spinifel.merging.lcurve import lcurve_corner
from spinifel.merging.operator import ToeplitzNormalOperator, kernel_spectrum
from spinifel.parallel.collectives import allreduce_sum, bcast_array, quiet_wait

log = logging.getLogger("spinifel")


@dataclass
class NormalEquations:
    """Globally summed pieces of the normal equations (identical on every rank).

    Attributes
    ----------
    rhs : ndarray (M, M, M) float64
        ``Re(A* D b)``.
    spectrum : ndarray (2M, 2M, M+1) float64
        Real spectrum of the Toeplitz kernel ``Re K``.
    weight_sum : float
        ``sum_p w_p`` over all pixels of all images: every diagonal entry of ``N``.
    data_norm_sq : float
        ``b^T D b``.
    """

    rhs: np.ndarray
    spectrum: np.ndarray
    weight_sum: float
    data_norm_sq: float


@dataclass
class MergeResult:
    """Outcome of :func:`merge` (identical on every rank)."""

    autocorrelation: np.ndarray
    lam: float
    lam_rel: float
    index: int
    lambdas_rel: list[float]
    residual_norms: list[float]
    solution_norms: list[float]
    cg_iterations: list[int]
    misfit_excess: list[float] = field(default_factory=list)
    cg_converged: bool = True
    heldout_misfit: list[float] = field(default_factory=list)
    criterion: str = "lcurve"


def accumulate_normal_equations(comm: Any, images: np.ndarray, quaternions: np.ndarray,
                                positions: np.ndarray, reciprocal_extent: float, M: int,
                                weights: np.ndarray | None = None, eps: float = 1e-6,
                                nthreads: int = 1, image_batch: int = 1024,
                                timings: dict | None = None,
                                cuda_aware_mpi: bool = False) -> NormalEquations:
    """Type-1 NUFFTs of this rank's images, summed over all ranks.

    Parameters
    ----------
    comm : communicator
        All ranks call this collectively.
    images : array (n_local, P)
        Local images at the good pixels (photons); numpy or cupy (then ``positions`` too
        and the result is on the device).
    quaternions : ndarray (n_local, 4)
        Current orientation of each local image.
    positions : ndarray (3, P)
        Reciprocal positions of the good pixels, inverse metres.
    weights : ndarray (P,) or None
        Pixel weights ``D`` (None = 1 for every pixel given).
    cuda_aware_mpi : bool
        Device arrays: pass them to MPI directly (True) or stage through the host.
    """
    t0 = time.perf_counter()
    xp = get_array_module(images, positions)
    P = positions.shape[1]
    w = xp.ones(P) if weights is None else to_module(weights, xp, dtype=np.float64)
    rhs = xp.zeros((M, M, M), dtype=np.complex128)
    kern = xp.zeros((2 * M,) * 3, dtype=np.complex128)
    data_sq = xp.zeros(())  # stays on the device: no synchronisation per batch
    # two plans for all batches (on a GPU a plan allocates its fine grid and cuFFT plan)
    plan_rhs = Type1((M,) * 3, eps, np.float64, nthreads, xp=xp)
    plan_kern = Type1((2 * M,) * 3, eps, np.float64, nthreads, xp=xp)
    for a in range(0, images.shape[0], image_batch):
        b = min(a + image_batch, images.shape[0])
        pts = rotated_points(quaternions[a:b], positions, reciprocal_extent, np.float64)
        x = xp.asarray(images[a:b], dtype=np.float64)
        vals = (x * w).ravel()
        plan_rhs.setpts(pts)
        rhs += plan_rhs.execute(vals)
        plan_kern.setpts(pts)
        kern += plan_kern.execute(xp.tile(w, b - a))
        data_sq += ((x * x) @ w).sum() if xp is not np else np.einsum(
            "np,np,p->", images[a:b], images[a:b], w, dtype=np.float64)
    scalars = to_module(xp.stack([w.sum() * images.shape[0], data_sq]), np, dtype=np.float64)
    return finish_normal_equations(comm, rhs, kern, scalars, t0, nthreads=nthreads,
                                   timings=timings, cuda_aware_mpi=cuda_aware_mpi)


def finish_normal_equations(comm: Any, rhs: Any, kern: Any, scalars: np.ndarray, t0: float, *,
                            nthreads: int = 1, timings: dict | None = None,
                            cuda_aware_mpi: bool = False) -> NormalEquations:
    """Sum this rank's type-1 grids and scalars over all ranks into :class:`NormalEquations`.

    ``rhs`` and ``kern`` are the local complex ``(M,M,M)`` / ``(2M,2M,2M)`` grids, ``scalars``
    the local ``[weight_sum, data_norm_sq]`` (float64, host); ``t0`` the start of the NUFFT
    work, for the ``merge_nufft`` / ``merge_allreduce`` timings (collective).
    """
    xp = get_array_module(rhs)
    t1 = time.perf_counter()
    rhs_real = xp.ascontiguousarray(rhs.real)
    kern_real = xp.ascontiguousarray(kern.real)
    allreduce_sum(comm, rhs_real, cuda_aware=cuda_aware_mpi)
    allreduce_sum(comm, kern_real, cuda_aware=cuda_aware_mpi)
    allreduce_sum(comm, scalars)
    t2 = time.perf_counter()
    spectrum = kernel_spectrum(kern_real, workers=nthreads)
    if timings is not None:
        timings["merge_nufft"] = timings.get("merge_nufft", 0.0) + (t1 - t0)
        timings["merge_allreduce"] = timings.get("merge_allreduce", 0.0) + (t2 - t1)
    return NormalEquations(rhs_real, spectrum, float(scalars[0]), float(scalars[1]))


def ball_support(M: int, radius_fraction: float = 1.0) -> np.ndarray:
    """Voxels within ``radius_fraction * (M-1)/2`` voxels of the centre, ``(M, M, M)`` bool."""
    c = (M - 1) / 2
    r = np.arange(M) - c
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    return d2 <= (radius_fraction * c) ** 2 + 1e-9


def solve_regularised(op: ToeplitzNormalOperator, eq: NormalEquations, lam: float, x0: np.ndarray,
                      x_init: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int, float, float]:
    """One Tikhonov solve; returns ``(x, iterations, residual_norm, solution_norm)``.

    The residual norm ``||D^1/2 (A x - b)||`` comes from the normal equations without
    another NUFFT: ``x.Nx - 2 x.r + b.Db``.
    """
    xp = get_array_module(eq.rhs)
    sup = op.support
    x0 = to_module(x0, xp)
    b = eq.rhs + lam * x0
    if sup is not None:
        b = xp.where(sup, b, 0.0)
        x_init = xp.where(sup, to_module(x_init, xp), 0.0)
    res = conjugate_gradient(lambda v: op(v, lam), b, to_module(x_init, xp), max_iter=max_iter,
                             tol=tol)
    x = res.x
    nx = op(x)  # N x on the support
    # two scalars to the host once per solve (after CG)
    misfit, solution = (float(v) for v in to_module(xp.stack([
        xp.vdot(x, nx) - 2.0 * xp.vdot(x, eq.rhs) + eq.data_norm_sq,
        xp.linalg.norm(x - (xp.where(sup, x0, 0.0) if sup is not None else x0))]), np))
    residual = float(np.sqrt(max(misfit, 0.0)))
    return x, int(res.n_iter), residual, solution


@dataclass
class Sweep:
    """The whole Tikhonov sweep, solved on one rank by :func:`solve_sweep`.

    Attributes
    ----------
    xs : list of arrays (M, M, M) float64
        Solution for each lambda, in the order given (module of ``eq.rhs``).
    residual_norms, solution_norms : list of float
        ``||D^1/2 (A x - b)||`` and ``||x - P x0||`` per lambda (photons).
    misfit_excess : list of float
        ``||D^1/2 (A x - b)||^2 - ||D^1/2 (A P x0 - b)||^2`` per lambda, evaluated without
        the cancelling ``b.Db`` term (photons^2; negative: x fits better than ``x0``). The
        residual norms differ across the sweep only through this term.
    n_iter : int
        CG iterations, shared by every lambda.
    converged : bool
        Every lambda reached the CG tolerance.
    """

    xs: list
    residual_norms: list[float]
    solution_norms: list[float]
    misfit_excess: list[float]
    n_iter: int
    converged: bool


def solve_sweep(op: ToeplitzNormalOperator, eq: NormalEquations, lams: Sequence[float],
                x0: np.ndarray, max_iter: int, tol: float) -> Sweep:
    """Every Tikhonov solve of the sweep at the cost of one, by multi-shift CG.

    With ``x = P x0 + y`` the system ``P (N + lam) P x = P (r + lam x0)`` becomes
    ``P (N + lam) P y = g`` with ``g = P (r - N P x0)`` for every ``lam``: one right-hand
    side, one Krylov space (:func:`~spinifel.merging.cg.multishift_cg`). The start is
    ``y = 0`` for every lambda (a warm start would give each shift its own initial
    residual).

    The misfit is ``c0 + f(y)`` with the constant ``c0 = ||A P x0 - b||^2`` (same for
    every lambda, so it cannot reorder them) and ``f(y) = y.N y - 2 y.g`` evaluated
    directly in float64: the differences between lambdas are no longer the round-off
    of ``x.Nx - 2 x.r + b.Db``, whose terms cancel to about 1e-4 of their size.

    Parameters
    ----------
    lams : sequence of float
        Absolute lambdas (``> 0``; the smallest must make ``N + lam`` positive definite).
    x0 : array (M, M, M)
        Prior (host or device).
    """
    xp = get_array_module(eq.rhs)
    sup = op.support
    x0 = to_module(x0, xp)
    if sup is not None:
        x0 = xp.where(sup, x0, 0.0)
    nx0 = op(x0)
    g = eq.rhs - nx0
    if sup is not None:
        g = xp.where(sup, g, 0.0)
    ms = multishift_cg(op, g, [float(v) for v in lams], max_iter=max_iter, tol=tol)
    c0 = xp.vdot(x0, nx0) - 2.0 * xp.vdot(x0, eq.rhs) + eq.data_norm_sq
    parts = []
    for y in ms.xs:
        parts += [xp.vdot(y, op(y) - 2.0 * g), xp.linalg.norm(y)]
    host = to_module(xp.stack([c0] + parts), np, dtype=np.float64)
    excess = [float(v) for v in host[1::2]]
    sol = [float(v) for v in host[2::2]]
    resid = [float(np.sqrt(max(host[0] + f, 0.0))) for f in excess]
    xs = [x0 + y for y in ms.xs]
    return Sweep(xs, resid, sol, excess, int(ms.n_iter), bool(ms.converged))


def _sweep_job(op: ToeplitzNormalOperator, eq: NormalEquations, lambdas_rel: Sequence[float],
               x0: np.ndarray, max_iter: int, tol: float,
               other: NormalEquations | None) -> tuple[Sweep, list[float]]:
    """One sweep; with ``other``, also each solution's misfit on ``other``'s images,
    ``x.N_o x - 2 x.r_o`` (photons^2, without the constant ``b_o.D b_o``)."""
    sw = solve_sweep(op, eq, [v * eq.weight_sum for v in lambdas_rel], x0, max_iter, tol)
    if other is None:
        return sw, []
    xp = get_array_module(eq.rhs)
    op_o = ToeplitzNormalOperator(other.spectrum, op.support, workers=op.workers)
    vals = xp.stack([xp.vdot(x, op_o(x) - 2.0 * other.rhs) for x in sw.xs])
    return sw, [float(v) for v in to_module(vals, np, dtype=np.float64)]


def merge(comm: Any, eq: NormalEquations, *, lambdas_rel: Sequence[float], x0: np.ndarray,
          x_init: np.ndarray, support: np.ndarray | None, max_iter: int, tol: float,
          nthreads: int = 1, timings: dict | None = None, cuda_aware_mpi: bool = False,
          holdout: tuple[NormalEquations, NormalEquations] | None = None) -> MergeResult:
    """Solve the lambda sweep, choose lambda, broadcast the chosen solution.

    Every rank must call this with identical ``eq`` and ``x0`` (and ``holdout``); they
    are, after :func:`accumulate_normal_equations` and the pipeline's broadcasts. Each
    sweep is one multi-shift CG (:func:`solve_sweep`): the full set's on rank 0 and, with
    ``holdout``, each half's on rank ``1 % size`` and ``2 % size``. The choice and the
    solution therefore do not depend on how many ranks run (given the equations).

    Parameters
    ----------
    holdout : (NormalEquations, NormalEquations) or None
        Normal equations of two disjoint halves of the images whose sum is ``eq``. Given:
        lambda is chosen by two-fold cross-validation, the minimum over the sweep of the
        misfit of each half's solution to the other half's images (held-out pixels).
        None: the L-curve corner (:func:`~spinifel.merging.lcurve.lcurve_corner`).
    x_init : array
        Accepted for compatibility, not used: multi-shift CG starts every lambda at ``x0``.

    Logs a warning when a CG did not reach ``tol`` within ``max_iter`` and when the chosen
    lambda is at an end of the sweep (the sweep then does not bracket the choice).
    ``x0`` and ``support`` may be host arrays: they are moved to the module of ``eq.rhs``,
    and so is the result.
    """
    t0 = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    n = len(lambdas_rel)
    jobs = [(eq, None)] + ([(holdout[0], holdout[1]), (holdout[1], holdout[0])]
                           if holdout is not None else [])
    x = None
    infos: list[Any] = [None] * len(jobs)
    for j, (e, other) in enumerate(jobs):
        if j % size != rank:
            continue
        op = ToeplitzNormalOperator(e.spectrum, support, workers=nthreads)
        sw, held = _sweep_job(op, e, lambdas_rel, x0, max_iter, tol, other)
        if j == 0:
            xs = sw.xs
        infos[j] = np.array([sw.n_iter, float(sw.converged)] + sw.residual_norms
                            + sw.solution_norms + sw.misfit_excess + held, dtype=np.float64)
    quiet_wait(comm)  # the ranks without a sweep sleep until the solvers are done
    t1 = time.perf_counter()
    infos = [bcast_array(comm, v, root=j % size, xp=np) for j, v in enumerate(infos)]
    resid = [float(v) for v in infos[0][2:2 + n]]
    norms = [float(v) for v in infos[0][2 + n:2 + 2 * n]]
    excess = [float(v) for v in infos[0][2 + 2 * n:2 + 3 * n]]
    n_iter = int(max(v[0] for v in infos))
    converged = all(bool(v[1]) for v in infos)
    if holdout is not None:
        held = [float(a + b) for a, b in zip(infos[1][2 + 3 * n:], infos[2][2 + 3 * n:])]
        order = np.argsort(lambdas_rel, kind="stable")
        k = int(order[np.argmin(np.array(held)[order])])
    else:
        held = []
        k = lcurve_corner(np.array(resid), np.array(norms), np.array(lambdas_rel)) if n > 1 else 0
    x = bcast_array(comm, xs[k] if rank == 0 else None, root=0, cuda_aware=cuda_aware_mpi,
                    xp=get_array_module(eq.rhs))
    if rank == 0:
        _warn_sweep(lambdas_rel, k, n_iter, converged, holdout is not None)
    t2 = time.perf_counter()
    if timings is not None:
        timings["merge_cg"] = timings.get("merge_cg", 0.0) + (t1 - t0)
        timings["merge_lcurve"] = timings.get("merge_lcurve", 0.0) + (t2 - t1)
    return MergeResult(autocorrelation=x, lam=lambdas_rel[k] * eq.weight_sum, lam_rel=lambdas_rel[k],
                       index=k, lambdas_rel=list(lambdas_rel), residual_norms=resid,
                       solution_norms=norms, cg_iterations=[n_iter] * n,
                       misfit_excess=excess, cg_converged=converged, heldout_misfit=held,
                       criterion=("holdout" if holdout is not None
                                  else "lcurve" if n > 1 else "fixed"))


def _warn_sweep(lambdas_rel: Sequence[float], k: int, n_iter: int, converged: bool,
                holdout: bool = False) -> None:
    """Log warnings for an unconverged sweep and a choice at an end of the sweep.

    An unconverged sweep invalidates the L-curve (its points are not Tikhonov solutions) but
    not the held-out choice, which scores the solutions actually computed (CG stopped early
    is itself a regulariser): INFO then, not WARNING.
    """
    if not converged and holdout:
        log.info("merge: CG stopped at %d iterations (algorithm.cg_max_iter) before cg_tol; "
                 "the held-out misfit ranks the solutions computed", n_iter)
    elif not converged:
        log.warning("merge: CG did not reach cg_tol in %d iterations (algorithm.cg_max_iter); "
                    "the L-curve points are then not exact Tikhonov solutions", n_iter)
    order = np.argsort(lambdas_rel)
    if len(lambdas_rel) > 2 and k in (int(order[0]), int(order[-1])):
        log.warning("merge: the chosen lambda is at the %s end of algorithm.lambdas "
                    "(lambda_rel %g): the sweep does not bracket the choice",
                    "small" if k == int(order[0]) else "large", lambdas_rel[k])


def add_normal_equations(a: NormalEquations, b: NormalEquations) -> NormalEquations:
    """Normal equations of the union of two disjoint image sets (everything is a sum)."""
    return NormalEquations(a.rhs + b.rhs, a.spectrum + b.spectrum, a.weight_sum + b.weight_sum,
                           a.data_norm_sq + b.data_norm_sq)


def solve_each(comm: Any, eqs: Sequence[NormalEquations], *, lam_rel: float,
               x0s: Sequence[np.ndarray], x_inits: Sequence[np.ndarray],
               support: np.ndarray | None, max_iter: int, tol: float,
               nthreads: int = 1) -> list[np.ndarray]:
    """Solve several independent systems at one relative lambda, spread over the ranks.

    System ``i`` is solved on rank ``i % size`` with ``lam = lam_rel * eqs[i].weight_sum``
    and broadcast from there (used for the half-set maps, which reuse the lambda the
    L-curve chose for the full set). Collective; returns the solutions on every rank.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    out = []
    for i, eq in enumerate(eqs):
        x = None
        if i % size == rank:
            op = ToeplitzNormalOperator(eq.spectrum, support, workers=nthreads)
            # host result: the half maps are phased and checkpointed from the host
            x = to_host(solve_regularised(op, eq, lam_rel * eq.weight_sum, x0s[i], x_inits[i],
                                          max_iter, tol)[0])
        out.append(x)
    return [bcast_array(comm, x, root=i % size) for i, x in enumerate(out)]
