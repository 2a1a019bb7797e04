"""The global merge: Tikhonov-regularised least squares for the autocorrelation.

Solves ``(N + lam I) x = r + lam x0`` on the ``M^3`` grid restricted to the
autocorrelation support, with ``N = Re(A* D A)`` (Toeplitz, :mod:`.operator`) and
``r = Re(A* D b)``. Both are type-1 NUFFTs of each rank's own images, summed over all
ranks with ``Allreduce``: the result does not depend on the number of ranks. The list of
regularisation values is fixed by the config; values are dealt to ranks round-robin, the
L-curve corner over all of them is chosen and its solution broadcast from its owner.

The only MPI this module sees is the communicator passed in, through
:mod:`spinifel.parallel.collectives`.

Arrays follow the module of the images (numpy, or cupy on a GPU: NUFFTs, the Toeplitz
FFTs and CG then stay on the device; only the Allreduce buffers and a few scalars per
solve cross to the host, see ``cuda_aware_mpi``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from spinifel.backend.arrays import get_array_module, to_host, to_module
from spinifel.backend.nufft import Type1
from spinifel.geometry.points import rotated_points
from spinifel.merging.cg import conjugate_gradient
from spinifel.merging.lcurve import lcurve_corner
from spinifel.merging.operator import ToeplitzNormalOperator, kernel_spectrum
from spinifel.parallel.collectives import allgather_objects, allreduce_sum, bcast_array
from spinifel.parallel.partition import round_robin

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
    t1 = time.perf_counter()
    rhs_real = xp.ascontiguousarray(rhs.real)
    kern_real = xp.ascontiguousarray(kern.real)
    scalars = to_module(xp.stack([w.sum() * images.shape[0], data_sq]), np, dtype=np.float64)
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


def merge(comm: Any, eq: NormalEquations, *, lambdas_rel: Sequence[float], x0: np.ndarray,
          x_init: np.ndarray, support: np.ndarray | None, max_iter: int, tol: float,
          nthreads: int = 1, timings: dict | None = None,
          cuda_aware_mpi: bool = False) -> MergeResult:
    """Sweep the regularisation values over the ranks and pick the L-curve corner.

    Every rank must call this with identical ``eq``, ``x0`` and ``x_init`` (they are,
    after :func:`accumulate_normal_equations` and the pipeline's broadcasts). ``x0``,
    ``x_init`` and ``support`` may be host arrays: they are moved to the module of
    ``eq.rhs``, and so is the result.
    """
    t0 = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    op = ToeplitzNormalOperator(eq.spectrum, support, workers=nthreads)
    n = len(lambdas_rel)
    mine = round_robin(n, size, rank)
    local: dict[int, tuple[np.ndarray, int, float, float]] = {}
    for i in mine:
        lam = lambdas_rel[i] * eq.weight_sum
        local[i] = solve_regularised(op, eq, lam, x0, x_init, max_iter, tol)
    t1 = time.perf_counter()
    summary = {i: (v[1], v[2], v[3]) for i, v in local.items()}
    gathered: dict[int, tuple[int, float, float]] = {}
    for part in allgather_objects(comm, summary):
        gathered.update(part)
    iters = [gathered[i][0] for i in range(n)]
    resid = [gathered[i][1] for i in range(n)]
    norms = [gathered[i][2] for i in range(n)]
    k = lcurve_corner(np.array(resid), np.array(norms), np.array(lambdas_rel)) if n > 1 else 0
    owner = k % size
    x = bcast_array(comm, local[k][0] if rank == owner else None, root=owner,
                    cuda_aware=cuda_aware_mpi)
    t2 = time.perf_counter()
    if timings is not None:
        timings["merge_cg"] = timings.get("merge_cg", 0.0) + (t1 - t0)
        timings["merge_lcurve"] = timings.get("merge_lcurve", 0.0) + (t2 - t1)
    return MergeResult(autocorrelation=x, lam=lambdas_rel[k] * eq.weight_sum, lam_rel=lambdas_rel[k],
                       index=k, lambdas_rel=list(lambdas_rel), residual_norms=resid,
                       solution_norms=norms, cg_iterations=iters)


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
