"""Normal equations of the merge with orientation posteriors (the expectation of the hard merge).

Derivation. With a posterior ``P_kj`` over orientations and fluence ``phi_k`` per image, the
merge minimises the expected, fluence-weighted least squares over the good pixels (pixel
weights ``D = diag(w)``)::

    E(x) = sum_k sum_j P_kj phi_k || D^1/2 (A_j x - K_k / phi_k) ||^2,

``A_j`` slicing the model at orientation ``j``. Setting the gradient to zero gives normal
equations of the same form as the hard merge (:mod:`spinifel.merging.merge`)::

    N = sum_kj (P_kj phi_k) A_j^* D A_j       (type-1 NUFFT of weights  P_kj phi_k w_p)
    r = sum_kj  P_kj        A_j^* D K_k       (type-1 NUFFT of values   P_kj w_p K_kp)

Pixel by pixel this is EMC's M-step ``W = sum P K / sum P phi``: the Poisson maximum
likelihood update, with the weight ``phi_k`` the inverse of a Poisson variance
``K / phi^2 ~ W / phi`` of the fluence-normalised image. With one-hot ``P`` and ``phi = 1``
the values and weights are exactly (bitwise) those of the hard merge, in the same batches.
The scalars generalise the same way: ``weight_sum = sum_p w_p sum_kj P_kj phi_k`` (every
diagonal entry of ``N``) and ``data_norm_sq = sum_kj P_kj ||K_k||_D^2 / phi_k``. Images with
``phi_k = 0`` (no photons) contribute nothing.

The kept (image, orientation, weight) pairs of all local images are listed (``O(n k)``
integers) and merged ``image_batch`` pairs per NUFFT call, so one call holds at most
``image_batch * P`` points, as in the hard merge; with one orientation per image the pairs
are the images and the batches are the same.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module
from spinifel.backend.nufft import Type1
from spinifel.merging.merge import NormalEquations
from spinifel.merging.operator import kernel_spectrum
from spinifel.parallel.collectives import allreduce_sum
from spinifel.slicing import rotated_points


def _pairs(indices: np.ndarray, weights: np.ndarray, n_kept: np.ndarray,
           fluence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kept (image, orientation, P, phi) pairs of the local images (host), image-major."""
    k = indices.shape[1]
    keep = (np.arange(k)[None, :] < n_kept[:, None]) & (fluence[:, None] > 0)
    img, slot = np.nonzero(keep)
    return img, indices[img, slot], weights[img, slot], fluence[img]


def accumulate_posterior_normal_equations(
        comm: Any, images: Any, posterior: Any, grid: np.ndarray, positions: Any,
        reciprocal_extent: float, M: int, weights: Any = None, eps: float = 1e-6,
        nthreads: int = 1, image_batch: int = 1024, timings: dict | None = None,
        cuda_aware_mpi: bool = False) -> NormalEquations:
    """Type-1 NUFFTs of this rank's images at their kept orientations, summed over ranks.

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
        (Image, orientation) pairs per NUFFT call (memory as the hard merge's images).

    Returns
    -------
    NormalEquations
        Identical on every rank; equal to :func:`spinifel.merging.merge.accumulate_normal_equations`
        with the argmax orientations when the posterior is one-hot and ``fluence = 1``.
    """
    t0 = time.perf_counter()
    xp = get_array_module(images, positions)
    P = positions.shape[1]
    w = xp.ones(P) if weights is None else to_module(weights, xp, dtype=np.float64)
    idx = np.asarray(to_module(posterior.indices, np))
    pw = np.asarray(to_module(posterior.weights, np), dtype=np.float64)
    nk = np.asarray(to_module(posterior.n_kept, np))
    phi = np.asarray(to_module(posterior.fluence, np), dtype=np.float64)
    rhs = xp.zeros((M, M, M), dtype=np.complex128)
    kern = xp.zeros((2 * M,) * 3, dtype=np.complex128)
    plan_rhs = Type1((M,) * 3, eps, np.float64, nthreads, xp=xp)
    plan_kern = Type1((2 * M,) * 3, eps, np.float64, nthreads, xp=xp)
    data_sq, weight_total = 0.0, 0.0
    pairs = _pairs(idx, pw, nk, phi)
    for a in range(0, len(pairs[0]), image_batch):
        img, orient, p, f = (v[a:a + image_batch] for v in pairs)
        pts = rotated_points(grid[orient], positions, reciprocal_extent, np.float64)
        x = xp.asarray(images[to_module(img, xp)], dtype=np.float64)
        plan_rhs.setpts(pts)
        rhs += plan_rhs.execute(((x * w) * to_module(p, xp)[:, None]).ravel())
        plan_kern.setpts(pts)
        kern += plan_kern.execute((to_module(p * f, xp)[:, None] * w[None, :]).ravel())
        # sum over pairs of P ||K||_D^2 / phi; x * sqrt(1 / 1) is x bitwise
        xs = x * to_module(np.sqrt(p / f), xp)[:, None]
        data_sq += float(to_module(((xs * xs) @ w).sum(), np)) if xp is not np else float(
            np.einsum("np,np,p->", xs, xs, w, dtype=np.float64))
        weight_total += float(np.sum(p * f))
    t1 = time.perf_counter()
    rhs_real = xp.ascontiguousarray(rhs.real)
    kern_real = xp.ascontiguousarray(kern.real)
    scalars = np.array([float(to_module(w.sum(), np)) * weight_total, data_sq])
    allreduce_sum(comm, rhs_real, cuda_aware=cuda_aware_mpi)
    allreduce_sum(comm, kern_real, cuda_aware=cuda_aware_mpi)
    allreduce_sum(comm, scalars)
    t2 = time.perf_counter()
    spectrum = kernel_spectrum(kern_real, workers=nthreads)
    if timings is not None:
        timings["merge_nufft"] = timings.get("merge_nufft", 0.0) + (t1 - t0)
        timings["merge_allreduce"] = timings.get("merge_allreduce", 0.0) + (t2 - t1)
    return NormalEquations(rhs_real, spectrum, float(scalars[0]), float(scalars[1]))
