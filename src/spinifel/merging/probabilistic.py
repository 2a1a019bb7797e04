"""Normal equations of the merge with orientation posteriors (the expectation of the hard merge).

Derivation. With a posterior ``P_kj`` over orientations and fluence ``phi_k`` per image, the
merge minimises the expected, fluence-weighted least squares over the good pixels (pixel
weights ``D = diag(w)``)::

    E(x) = sum_k sum_j P_kj phi_k || D^1/2 (A_j x - (K_k - b) / phi_k) ||^2,

``A_j`` slicing the model at orientation ``j`` and ``b`` the background (photons per pixel,
0 without one: the data minus the background estimate the signal ``phi_k W``, see
:mod:`spinifel.orientation.background`). Setting the gradient to zero gives normal
equations of the same form as the hard merge (:mod:`spinifel.merging.merge`)::

    N = sum_kj (P_kj phi_k) A_j^* D A_j       (type-1 NUFFT of weights  P_kj phi_k w_p)
    r = sum_kj  P_kj        A_j^* D (K_k - b) (type-1 NUFFT of values   P_kj w_p (K_kp - b_p))

Pixel by pixel this is EMC's M-step ``W = sum P (K - b) / sum P phi``: the Poisson maximum
likelihood update, with the weight ``phi_k`` the inverse of a Poisson variance
``K / phi^2 ~ W / phi`` of the fluence-normalised image. The scalars generalise the same
way: ``weight_sum = sum_p w_p sum_kj P_kj phi_k`` (every diagonal entry of ``N``) and
``data_norm_sq = sum_kj P_kj ||K_k - b||_D^2 / phi_k``. Images with ``phi_k = 0`` (no
photons) contribute nothing.

Aggregation per orientation (EMC). Every image shares the same good pixels, so both sums
over ``k`` are taken before the NUFFTs, orientation by orientation::

    r = sum_j A_j^* D R_j,   R_j = sum_k P_kj (K_k - b)     (a sparse (J x n) @ (n x P) product)
    N = sum_j c_j A_j^* D A_j,   c_j = sum_k P_kj phi_k      (a scalar per orientation)

and the type-1 NUFFTs run once per orientation that carries weight (the "active" ones,
``J_a <= min(J, n k)``), as if each were an image ``R_j`` with pixel weights ``c_j w``.
With several ranks and the shared grid, each rank's ``R_j`` and ``c_j`` are reduced onto
the rank that owns ``j`` (blocks of ``image_batch`` active orientations, round-robin), and
only the owner runs its NUFFTs: the NUFFT work per rank is ``J_a / R``, that of a hard
merge of ``J_a / R`` images, whatever the number kept per image; the reduction moves
``J_a P`` float64 values per rank. The sparse product costs ``O(n k P)``. The result equals
the per-pair sum up to float64 round-off (the NUFFT is linear: only the summation order
changes) and is summed over ranks by the same Allreduce, so it does not depend on the
number of ranks beyond round-off. Memory: one block of ``image_batch`` orientations per
NUFFT call (``image_batch * P`` points, as the hard merge), and the images are converted
to float64 ``image_batch`` at a time.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import numpy as np
import scipy.sparse

from spinifel.backend.arrays import get_array_module, to_module
from spinifel.backend.nufft import Type1
from spinifel.geometry.points import rotated_points
from spinifel.merging.merge import NormalEquations, finish_normal_equations
from spinifel.parallel.collectives import allreduce_sum, reduce_sum


def _pairs(indices: np.ndarray, weights: np.ndarray, n_kept: np.ndarray,
           fluence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kept (image, orientation, P, phi) pairs of the local images (host), image-major."""
    k = indices.shape[1]
    keep = (np.arange(k)[None, :] < n_kept[:, None]) & (fluence[:, None] > 0)
    img, slot = np.nonzero(keep)
    return img, indices[img, slot], weights[img, slot], fluence[img]


def orientation_weights(posterior: Any) -> tuple[np.ndarray, scipy.sparse.csr_matrix,
                                                 np.ndarray, np.ndarray]:
    """The posterior as a sparse (active orientation x image) matrix, on the host.

    Parameters
    ----------
    posterior : spinifel.orientation.likelihood.Posterior
        Of the ``n`` local images (host or device; ``O(n k)`` values are copied to the host).

    Returns
    -------
    active : ndarray (J_a,) int64
        Grid indices of the orientations kept by some local image with ``phi > 0``, ascending.
    matrix : scipy.sparse.csr_matrix (J_a, n) float64
        ``P_kj`` at row ``active.searchsorted(j)``, column ``k``.
    kernel_weight : ndarray (J_a,) float64
        ``c_j = sum_k P_kj phi_k``.
    mass : ndarray (J_a,) float64
        ``sum_k P_kj`` (the background subtracted from ``R_j`` is ``mass_j b``).
    """
    idx = np.asarray(to_module(posterior.indices, np))
    pw = np.asarray(to_module(posterior.weights, np), dtype=np.float64)
    nk = np.asarray(to_module(posterior.n_kept, np))
    phi = np.asarray(to_module(posterior.fluence, np), dtype=np.float64)
    img, orient, p, f = _pairs(idx, pw, nk, phi)
    active, row = np.unique(orient, return_inverse=True)
    matrix = scipy.sparse.csr_matrix((p, (row, img)), shape=(len(active), len(nk)))
    return (active.astype(np.int64), matrix, np.bincount(row, p * f, len(active)),
            np.bincount(row, p, len(active)))


def _sparse_to(matrix: scipy.sparse.csr_matrix, xp: Any) -> Any:
    """The CSR matrix on the module of the images (cupyx.scipy.sparse on a GPU)."""
    if xp is np:
        return matrix
    sp = importlib.import_module("cupyx.scipy.sparse")
    return sp.csr_matrix((xp.asarray(matrix.data), xp.asarray(matrix.indices),
                          xp.asarray(matrix.indptr)), shape=matrix.shape)


def _aggregate(images: Any, rows: scipy.sparse.csr_matrix, xp: Any, image_batch: int) -> Any:
    """``R = rows @ images`` (float64, ``(B, P)``), the images converted a block at a time."""
    out = xp.zeros((rows.shape[0], images.shape[1]), dtype=np.float64)
    csc = rows.tocsc()
    used = np.flatnonzero(np.diff(csc.indptr))  # images with weight in these rows
    for a in range(0, len(used), image_batch):
        cols = used[a:a + image_batch]
        x = xp.asarray(images[to_module(cols, xp)], dtype=np.float64)
        out += _sparse_to(csc[:, cols].tocsr(), xp) @ x
    return out


def _data_norm_sq(images: Any, posterior: Any, w: Any, background: Any, xp: Any,
                  image_batch: int) -> float:
    """``sum_k (sum_j P_kj) ||K_k - b||_D^2 / phi_k`` over the images with ``phi_k > 0``."""
    pw = np.asarray(to_module(posterior.weights, np), dtype=np.float64)
    nk = np.asarray(to_module(posterior.n_kept, np))
    phi = np.asarray(to_module(posterior.fluence, np), dtype=np.float64)
    mass = np.where(np.arange(pw.shape[1])[None, :] < nk[:, None], pw, 0.0).sum(axis=1)
    scale = np.where(phi > 0, mass / np.where(phi > 0, phi, 1.0), 0.0)
    total = 0.0
    for a in range(0, images.shape[0], image_batch):
        x = xp.asarray(images[a:a + image_batch], dtype=np.float64)
        if background is not None:
            x = x - background
        q = (x * x) @ w
        total += float(to_module(q @ to_module(scale[a:a + image_batch], xp), np))
    return total


def accumulate_posterior_normal_equations(
        comm: Any, images: Any, posterior: Any, grid: np.ndarray, positions: Any,
        reciprocal_extent: float, M: int, weights: Any = None, eps: float = 1e-6,
        nthreads: int = 1, image_batch: int = 1024, timings: dict | None = None,
        cuda_aware_mpi: bool = False, background: Any = None,
        shared_grid: bool = True) -> NormalEquations:
    """Type-1 NUFFTs of this rank's posterior-aggregated data, summed over ranks.

    Parameters
    ----------
    comm : communicator
        All ranks call this collectively (Allreduce of the grids and scalars).
    images : array (n_local, P)
        Local photon counts at the good pixels (numpy or cupy; ``positions`` alike).
    posterior : spinifel.orientation.likelihood.Posterior
        ``indices``, ``weights``, ``n_kept`` and ``fluence`` of the local images (host or
        device; copied to the host, they are ``O(n k)``).
    grid : ndarray (J, 4)
        The orientation grid the posterior indexes (identical on every rank).
    positions : array (3, P)
        Reciprocal positions of the good pixels, inverse metres.
    reciprocal_extent : float
        Largest ``|s|``, inverse metres.
    M : int
        Autocorrelation grid size.
    weights : array (P,) or None
        Pixel weights ``D`` (None = 1).
    image_batch : int
        Active orientations per NUFFT call, and images per float64 conversion block.
    background : array (P,) float64 or None
        Background ``b`` in photons per good pixel, subtracted from the data (None = 0).
    shared_grid : bool
        ``grid`` is the same on every rank (the orientation grid): each active orientation
        is NUFFT-ed once, by one rank, after its sums are reduced onto it
        (:func:`_nufft_owned_blocks`). False (a per-rank list such as refined orientations):
        every rank NUFFTs its own.

    Returns
    -------
    NormalEquations
        Identical on every rank; equal to :func:`spinifel.merging.merge.accumulate_normal_equations`
        with the argmax orientations, up to round-off, when the posterior is one-hot,
        ``fluence = 1`` and there is no background.
    """
    t0 = time.perf_counter()
    xp = get_array_module(images, positions)
    P = positions.shape[1]
    w = xp.ones(P) if weights is None else to_module(weights, xp, dtype=np.float64)
    bg = None if background is None else to_module(background, xp, dtype=np.float64)
    weighted = orientation_weights(posterior)
    grids = _Type1Grids(M, eps, nthreads, xp)
    if shared_grid and comm.Get_size() > 1:
        _nufft_owned_blocks(comm, images, weighted, grid, positions, reciprocal_extent, w, bg,
                            grids, image_batch, cuda_aware_mpi)
    else:
        active, matrix, c, mass = weighted
        for a in range(0, len(active), image_batch):
            b = min(a + image_batch, len(active))
            data = _aggregate(images, matrix[a:b], xp, image_batch)
            grids.add(data, c[a:b], mass[a:b], grid[active[a:b]], positions, reciprocal_extent,
                      w, bg)
    data_sq = _data_norm_sq(images, posterior, w, bg, xp, image_batch)
    scalars = np.array([float(to_module(w.sum(), np)) * float(weighted[2].sum()), data_sq])
    return finish_normal_equations(comm, grids.rhs, grids.kern, scalars, t0, nthreads=nthreads,
                                   timings=timings, cuda_aware_mpi=cuda_aware_mpi)


class _Type1Grids:
    """The merge's two type-1 NUFFT sums (data onto ``M^3``, weights onto ``(2M)^3``)."""

    def __init__(self, M: int, eps: float, nthreads: int, xp: Any) -> None:
        self.xp = xp
        self.rhs = xp.zeros((M, M, M), dtype=np.complex128)
        self.kern = xp.zeros((2 * M,) * 3, dtype=np.complex128)
        self.plan_rhs = Type1((M,) * 3, eps, np.float64, nthreads, xp=xp)
        self.plan_kern = Type1((2 * M,) * 3, eps, np.float64, nthreads, xp=xp)

    def add(self, data: Any, c: np.ndarray, mass: np.ndarray, quats: np.ndarray, positions: Any,
            extent: float, w: Any, bg: Any) -> None:
        """Add orientations ``quats`` (B, 4) with aggregated data ``R`` (B, P), kernel
        weights ``c`` (B,) and posterior mass (B,) (the background to subtract)."""
        xp = self.xp
        if bg is not None:
            data = data - to_module(mass, xp)[:, None] * bg[None, :]
        pts = rotated_points(quats, positions, extent, np.float64)
        self.plan_rhs.setpts(pts)
        self.rhs += self.plan_rhs.execute((data * w).ravel())
        self.plan_kern.setpts(pts)
        self.kern += self.plan_kern.execute((to_module(c, xp)[:, None] * w[None, :]).ravel())


def _nufft_owned_blocks(comm: Any, images: Any, weighted: tuple, grid: np.ndarray,
                        positions: Any, extent: float, w: Any, bg: Any, grids: _Type1Grids,
                        block: int, cuda_aware: bool) -> None:
    """The NUFFTs of a grid shared by all ranks, each orientation's once (collective).

    The orientations active on any rank are cut into blocks of ``block``; block ``i`` is
    owned by rank ``i mod R``. Every rank sums its images into each block (zeros where it
    keeps none of its orientations) and the blocks are reduced onto their owners, a round of
    ``R`` blocks at a time, so each rank holds one block and all ranks run their NUFFTs at
    once: the NUFFT work per rank is ``1/R`` of the active orientations instead of all of
    them. The result equals every rank NUFFT-ing its own sums, up to round-off (the NUFFT is
    linear).
    """
    active, matrix, c, mass = weighted
    xp = grids.xp
    size, rank = comm.Get_size(), comm.Get_rank()
    flags = np.zeros(len(grid), dtype=np.int32)
    flags[active] = 1
    everywhere = np.flatnonzero(allreduce_sum(comm, flags))
    blocks = [everywhere[a:a + block] for a in range(0, len(everywhere), block)]
    for first in range(0, len(blocks), size):
        mine = None
        for owner, orient in enumerate(blocks[first:first + size]):
            pos = np.minimum(np.searchsorted(active, orient), max(len(active) - 1, 0))
            here = (active[pos] == orient) if len(active) else np.zeros(len(orient), bool)
            local = xp.zeros((len(orient), images.shape[1]), dtype=np.float64)
            scalars = np.zeros((2, len(orient)))
            if here.any():
                local[to_module(np.flatnonzero(here), xp)] = _aggregate(
                    images, matrix[pos[here]], xp, block)
                scalars[:, here] = c[pos[here]], mass[pos[here]]
            data = reduce_sum(comm, local, owner, cuda_aware)
            summed = reduce_sum(comm, scalars, owner)
            if owner == rank:
                mine = (orient, data, summed)
        if mine is not None:
            orient, data, summed = mine
            grids.add(data, summed[0], summed[1], grid[orient], positions, extent, w, bg)
