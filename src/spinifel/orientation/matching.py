"""Orientation matching: each image takes the orientation of its nearest model slice.

Squared Euclidean distances ``||x||^2 + ||y||^2 - 2 x.y`` over the good pixels are
computed as one GEMM per (image block, slice batch) with a running minimum, so memory is
bounded by the batch sizes and does not grow with the number of orientations.

With ``transform="sqrt"`` images and model slices are compared as square roots (model
values clipped at 0 first). The square root stabilises Poisson variance and compresses the
intensity's huge dynamic range, so the speckles at medium and high resolution, which tell
orientations apart, are not drowned by the nearly isotropic central peak.

With ``scale_per_image`` the model slice is first scaled by the best non-negative factor
``c = max(x.y, 0) / ||y||^2`` (images with varying fluence); the distance is then
``||x||^2 - max(x.y, 0)^2 / ||y||^2``.

Everything follows the array module of the images: with cupy arrays the (GEMM + argmin)
of each batch is our fused CUDA kernel (``spinifel/cuda/match_fused.cu``), which reduces
straight to the best (distance, index) per image without the ``n x B`` distance matrix;
the numpy path below is its reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module


@dataclass
class MatchState:
    """Running best match of each local image.

    Attributes
    ----------
    best_index : ndarray (n_images,) int64
        Index into the orientation grid of the nearest model slice so far (-1 = none).
    best_dist : ndarray (n_images,) float64
        Its squared distance.
    best_scale : ndarray (n_images,) float64
        The fitted scale factor (1 without ``scale_per_image``).
    """

    best_index: np.ndarray
    best_dist: np.ndarray
    best_scale: np.ndarray

    @classmethod
    def empty(cls, n_images: int, xp: Any = np) -> "MatchState":
        return cls(xp.full(n_images, -1, dtype=np.int64), xp.full(n_images, np.inf),
                   xp.ones(n_images))

    def to(self, xp: Any) -> "MatchState":
        """The same state on array module ``xp`` (host staging for MPI, back to the device)."""
        return MatchState(to_module(self.best_index, xp), to_module(self.best_dist, xp),
                          to_module(self.best_scale, xp))

    def merge(self, other: "MatchState") -> None:
        """Keep, per image, the better of two states (ties: the lower orientation index)."""
        better = (other.best_dist < self.best_dist) | (
            (other.best_dist == self.best_dist) & (other.best_index < self.best_index)
            & (other.best_index >= 0))
        self.best_index[better] = other.best_index[better]
        self.best_dist[better] = other.best_dist[better]
        self.best_scale[better] = other.best_scale[better]


def update_matches(state: MatchState, images: np.ndarray, image_sq: np.ndarray, slices: np.ndarray,
                   offset: int, scale_per_image: bool = False, image_batch: int = 4096) -> None:
    """Fold one batch of model slices into the running best match.

    Parameters
    ----------
    state : MatchState
        Updated in place.
    images : ndarray (n_images, P) float32/float64
        Local images over the good pixels.
    image_sq : ndarray (n_images,) float64
        ``||x||^2`` of each image (precomputed once).
    slices : ndarray (B, P)
        Model slices of orientations ``offset .. offset + B - 1``, same dtype as images.

    With cupy arrays the fused kernel does the work (:func:`_update_matches_fused`).
    """
    xp = get_array_module(images, slices)
    if xp is not np:
        _update_matches_fused(state, images, slices, offset, scale_per_image, image_batch)
        return
    slices = np.asarray(slices, dtype=images.dtype)
    slice_sq = np.einsum("bp,bp->b", slices, slices, dtype=np.float64)
    for a in range(0, images.shape[0], image_batch):
        b = min(a + image_batch, images.shape[0])
        cross = images[a:b] @ slices.T  # (n, B) GEMM, dominates the cost
        if scale_per_image:
            pos = np.maximum(cross, 0).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                gain = np.where(slice_sq > 0, pos * pos / slice_sq, 0.0)
            idx = np.argmax(gain, axis=1)
            rows = np.arange(b - a)
            dist = image_sq[a:b] - gain[rows, idx]
            den = slice_sq[idx]
            scale = np.divide(pos[rows, idx], den, out=np.zeros(b - a), where=den > 0)
        else:
            # ||x||^2 is constant per image: argmin of ||y||^2 - 2 x.y.
            part = slice_sq[None, :] - 2.0 * cross
            idx = np.argmin(part, axis=1)
            rows = np.arange(b - a)
            dist = image_sq[a:b] + part[rows, idx]
            scale = np.ones(b - a)
        # ties go to the lower orientation index, so the order in which batches arrive
        # (replicated or ring-distributed matching) cannot change the result
        gidx = idx + offset
        better = (dist < state.best_dist[a:b]) | (
            (dist == state.best_dist[a:b]) & (gidx < state.best_index[a:b]))
        sl = np.arange(a, b)[better]
        state.best_index[sl] = gidx[better]
        state.best_dist[sl] = dist[better]
        state.best_scale[sl] = scale[better]


def _fold(state: MatchState, a: int, b: int, dist, gidx, scale) -> None:
    """Keep the better of ``state[a:b]`` and a new candidate (ties: lower index)."""
    xp = get_array_module(dist)
    better = (dist < state.best_dist[a:b]) | (
        (dist == state.best_dist[a:b]) & (gidx < state.best_index[a:b]))
    state.best_index[a:b] = xp.where(better, gidx, state.best_index[a:b])
    state.best_dist[a:b] = xp.where(better, dist, state.best_dist[a:b])
    state.best_scale[a:b] = xp.where(better, scale, state.best_scale[a:b])


def _update_matches_fused(state: MatchState, images, slices, offset: int,
                          scale_per_image: bool, image_batch: int) -> None:
    """GPU path of :func:`update_matches`: one fused kernel launch per image block.

    The kernel computes float32 distances (``match_fused_reference`` is its numpy twin),
    all pixels weighted 1 (masked pixels are already removed from images and slices).
    The scale factor of the winning slice is recomputed from that slice alone.
    """
    from spinifel.backend.kernels import match_fused_gpu

    xp = get_array_module(images)
    slices = xp.ascontiguousarray(slices, dtype=xp.float32)
    weights = xp.ones(slices.shape[1], dtype=xp.float32)
    for a in range(0, images.shape[0], image_batch):
        b = min(a + image_batch, images.shape[0])
        x = xp.ascontiguousarray(images[a:b], dtype=xp.float32)
        dist, gidx = match_fused_gpu(x, slices, weights, scale_per_image, slice_offset=offset)
        if scale_per_image:
            y = slices[gidx - offset].astype(xp.float64)
            cross = xp.maximum(xp.einsum("np,np->n", x.astype(xp.float64), y), 0)
            ysq = xp.einsum("np,np->n", y, y)
            scale = xp.where(ysq > 0, cross / xp.where(ysq > 0, ysq, 1), 0.0)
        else:
            scale = xp.ones(b - a)
        _fold(state, a, b, dist, gidx, scale)


TRANSFORMS = ("none", "sqrt")

# Model slices per image and round of refine_orientations, by stencil.
REFINE_SLICES_PER_ROUND = {"axes": 8, "cube": 27}


def apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
    """The matching transform of images or model slices (``"none"`` or ``"sqrt"``)."""
    if transform == "none":
        return x
    if transform == "sqrt":
        xp = get_array_module(x)
        return xp.sqrt(xp.maximum(x, 0, dtype=x.dtype))
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def match_orientations(images: np.ndarray, slice_batches: Iterable[tuple[int, np.ndarray]],
                       scale_per_image: bool = False, image_batch: int = 4096,
                       transform: str = "none") -> MatchState:
    """Nearest model slice of every image over a stream of slice batches.

    Parameters
    ----------
    images : ndarray (n_images, P)
        Local images over the good pixels (masked pixels removed).
    slice_batches : iterable of (offset, ndarray (B, P))
        Model slices with the grid index of their first orientation (``Slicer.iter_batches``).
    transform : {"none", "sqrt"}
        Applied to images and slices before the distance.

    Returns
    -------
    MatchState
    """
    xp = get_array_module(images)
    images = apply_transform(images, transform)
    image_sq = xp.einsum("np,np->n", images, images, dtype=np.float64) if xp is np else None
    state = MatchState.empty(images.shape[0], xp)
    for offset, slices in slice_batches:
        update_matches(state, images, image_sq, apply_transform(slices, transform), offset,
                       scale_per_image, image_batch)
    return state


def _local_offsets(step: float) -> np.ndarray:
    """27 small rotations ``exp(v)``, ``v`` on the cube ``{-step, 0, step}^3`` (radians).

    Returned as quaternions ``(27, 4)``; index 13 is the identity.
    """
    g = np.array([-1.0, 0.0, 1.0]) * step
    return _rotvec_to_quaternion(np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3))


def _axis_offsets(step: float) -> np.ndarray:
    """7 rotations: identity (index 0), then ``exp(+-step e_x)``, ``+-e_y``, ``+-e_z``."""
    v = np.zeros((7, 3))
    for i in range(3):
        v[1 + 2 * i, i] = -step
        v[2 + 2 * i, i] = step
    return _rotvec_to_quaternion(v)


def _rotvec_to_quaternion(v: np.ndarray) -> np.ndarray:
    """Quaternions ``exp(v)`` of rotation vectors ``v`` (..., 3), radians; ``v = 0`` -> identity."""
    angle = np.linalg.norm(v, axis=-1)
    axis = np.divide(v, angle[..., None], out=np.zeros_like(v), where=angle[..., None] > 0)
    return np.concatenate([np.cos(angle / 2)[..., None], np.sin(angle / 2)[..., None] * axis],
                          axis=-1)


def _parabolic_offsets(d: np.ndarray, step: float) -> np.ndarray:
    """Per-axis minimum of the parabola through ``d(-step), d(0), d(+step)``.

    ``d`` is ``(n, 7)`` in the order of :func:`_axis_offsets`; returns rotation vectors
    ``(n, 3)`` within the cube of half-width ``step``. Where an axis is not convex the move
    goes to the better end point (or stays when both ends are worse or equal).
    """
    d0 = d[:, :1]
    dm, dp = d[:, 1::2], d[:, 2::2]
    curv = dp + dm - 2 * d0
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(curv > 0, 0.5 * (dm - dp) / np.where(curv > 0, curv, 1), 0.0)
    t = np.where(curv > 0, t, np.where(dp < np.minimum(dm, d0), 1.0, np.where(dm < d0, -1.0, 0.0)))
    return step * np.clip(t, -1.0, 1.0)


def _candidate_distances(images, cand, slicer, transform, scale_per_image, n_per_image):
    """Distances ``(n, k)`` of each image to its own ``k`` candidate orientations."""
    xp = get_array_module(images)
    n = images.shape[0]
    y = apply_transform(slicer.slices(cand), transform).reshape(n, n_per_image, -1)
    x = images
    if xp is np:
        cross = np.einsum("np,nkp->nk", x, y, dtype=np.float64)
        ysq = np.einsum("nkp,nkp->nk", y, y, dtype=np.float64)
        xsq = np.einsum("np,np->n", x, x, dtype=np.float64)[:, None]
    else:  # float64 accumulation on the device too (the candidates are close)
        x64, y64 = x.astype(xp.float64), y.astype(xp.float64)
        cross = xp.einsum("np,nkp->nk", x64, y64)
        ysq = xp.einsum("nkp,nkp->nk", y64, y64)
        xsq = xp.einsum("np,np->n", x64, x64)[:, None]
    if scale_per_image:
        pos = xp.maximum(cross, 0)
        d = xsq - xp.where(ysq > 0, pos * pos / xp.where(ysq > 0, ysq, 1), 0)
    else:
        d = xsq + ysq - 2 * cross
    # the candidate quaternions live on the host: one small copy per image block
    return to_module(d, np)


def refine_orientations(images: np.ndarray, quaternions: np.ndarray, slicer, step: float,
                        n_rounds: int = 2, scale_per_image: bool = False,
                        image_batch: int = 256, transform: str = "none",
                        stencil: str = "axes", scorer: Callable | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Local search around each image's orientation, off the grid.

    Each round searches rotations ``q * exp(v)`` about the current orientation with ``v``
    in a cube of half-width ``step``, keeps the nearest model slice (the same distance as
    :func:`match_orientations`) and halves ``step``. After ``n`` rounds the orientation is
    resolved to about ``step / 2^n``: finer than any affordable grid, at a cost that grows
    with the images, not the grid.

    ``stencil="cube"`` tries the 27 points ``v`` in ``{-step, 0, step}^3``.
    ``stencil="axes"`` (default) tries the identity and ``+-step`` along each axis (7
    points), puts a parabola through the three values on each axis, and tries the point at
    the three parabolas' minima (1 more): 8 slices per image and round instead of 27, and
    the minimum is located continuously rather than on the 3-point lattice. In both, the
    result is the best point tried, so the fit never gets worse.

    Parameters
    ----------
    images : ndarray (n_images, P)
        Local images over the good pixels.
    quaternions : ndarray (n_images, 4)
        Starting orientations (the grid match).
    slicer : spinifel.orientation.slicing.Slicer
        Model of the current autocorrelation at the same pixels.
    step : float
        Initial half-width in radians (half the grid spacing is a good start).
    stencil : {"axes", "cube"}
        Search points per round (see above).
    scorer : callable or None
        Another objective to minimise instead of the distance: ``scorer(rows, slices, k)``
        with ``rows`` the ``slice`` of the image block, ``slices`` the model slices
        ``(n_rows * k, P)`` of its candidates (image-major) returns ``(n_rows, k)`` values
        on the host (e.g. minus the Poisson log-likelihood). ``transform`` and
        ``scale_per_image`` are then unused.

    Returns
    -------
    (quaternions (n_images, 4), distances (n_images,))
    """
    from spinifel.geometry.orientations import canonical, multiply

    if stencil not in REFINE_SLICES_PER_ROUND:
        raise ValueError(f"stencil must be 'axes' or 'cube', got {stencil!r}")
    if scorer is None:
        images = apply_transform(images, transform)

    def objective(a: int, b: int, cand: np.ndarray, k: int) -> np.ndarray:
        if scorer is not None:
            return np.asarray(to_module(scorer(slice(a, b), slicer.slices(cand), k), np))
        return _candidate_distances(images[a:b], cand, slicer, transform, scale_per_image, k)

    q = np.array(to_module(quaternions, np), dtype=np.float64, copy=True)
    dist = np.full(len(q), np.inf)
    for r in range(n_rounds):
        h = step / 2**r
        offsets = _local_offsets(h) if stencil == "cube" else _axis_offsets(h)
        k = len(offsets)
        for a in range(0, len(q), image_batch):
            b = min(a + image_batch, len(q))
            n = b - a
            cand = multiply(q[a:b, None, :], offsets[None, :, :])  # (n, k, 4)
            d = objective(a, b, cand.reshape(-1, 4), k)
            if stencil == "axes":
                extra = multiply(q[a:b], _rotvec_to_quaternion(_parabolic_offsets(d, h)))
                d_extra = objective(a, b, extra, 1)
                cand = np.concatenate([cand, extra[:, None, :]], axis=1)
                d = np.concatenate([d, d_extra], axis=1)
            best = np.argmin(d, axis=1)
            q[a:b] = cand[np.arange(n), best]
            dist[a:b] = d[np.arange(n), best]
    return canonical(q), dist


def match_distributed(comm, images: np.ndarray, slicer, grid: np.ndarray, batch: int,
                      scale_per_image: bool = False, image_batch: int = 4096,
                      transform: str = "none", timings: dict | None = None) -> MatchState:
    """Ring-distributed matching: each rank slices only its share of the orientation grid.

    Rank ``r`` models the contiguous block ``block_range(K, R, r)`` of the grid once and
    keeps those slices (memory ``K P / R``). The image blocks then travel around the ring
    of ranks together with their running best match; after ``R`` steps every image has met
    every orientation and its state is sent home. The result equals
    :func:`match_orientations` over the whole grid (ties go to the lower index in both).
    Communication per rank: ``R - 1`` image blocks plus their states.

    Parameters
    ----------
    comm : communicator
        Collective: every rank calls this (``sendrecv``, ``Get_rank``, ``Get_size``).
    images : ndarray (n_local, P)
        This rank's images (untransformed).
    slicer : spinifel.orientation.slicing.Slicer
        Model at the same pixels as ``images``.
    grid : ndarray (K, 4)
        The whole orientation grid (identical on every rank).
    """
    import time

    from spinifel.parallel.collectives import ring_shift
    from spinifel.parallel.partition import block_range

    rank, size = comm.Get_rank(), comm.Get_size()
    a, b = block_range(len(grid), size, rank)
    t = time.perf_counter()
    mine = [(a + o, apply_transform(sl, transform)) for o, sl in slicer.iter_batches(grid[a:b], batch)]
    if timings is not None:
        timings["slicing"] = timings.get("slicing", 0.0) + time.perf_counter() - t
    xp = get_array_module(images)
    block = xp.ascontiguousarray(apply_transform(images, transform))
    state = MatchState.empty(block.shape[0], xp)
    for step in range(size):
        sq = np.einsum("np,np->n", block, block, dtype=np.float64) if xp is np else None
        for offset, sl in mine:
            update_matches(state, block, sq, sl, offset, scale_per_image, image_batch)
        if step < size - 1:
            # device arrays travel through host memory (pickled sendrecv)
            block, state = ring_shift(comm, (to_module(block, np), state.to(np)))
            block, state = to_module(block, xp), state.to(xp)
    # After size - 1 shifts this rank holds the block of rank + 1: send each state home.
    if size > 1:
        state = ring_shift(comm, state.to(np)).to(xp)
    return state
