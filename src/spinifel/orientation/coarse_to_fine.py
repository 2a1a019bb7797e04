"""Coarse-to-fine orientation search.

Exhaustive matching compares every image with every orientation of the fine grid
(``n_images x K`` distances). The coarse-to-fine search does it in two passes:

1. **Coarse pass**: every image against a coarse grid of ``K_c`` orientations, on the inner
   pixels only (``|s|`` below a fraction of the largest). At low resolution the distance
   varies slowly with the orientation, so a coarse grid samples it well enough to find
   the right neighbourhood. The ``k`` nearest coarse orientations of each image are kept
   (:func:`top_k_matches`, one GEMM per slice batch like :func:`~spinifel.orientation.matching.update_matches`).
2. **Fine pass**: every coarse orientation ``c`` has a precomputed list ``N(c)`` of the fine
   orientations within a misorientation radius of it (:func:`grid_neighbours`). The images
   that kept ``c`` among their candidates are compared, with all pixels and the same
   distance as exhaustive matching, with the fine orientations ``N(c)``: one GEMM per
   coarse orientation. Each fine slice needed is computed once.

With ``twins`` the fine pass also searches around the half turn about the beam of every
candidate (:func:`twin_rotation`): Friedel symmetry makes those two orientations give
nearly the same image at low resolution, so the coarse pass alone cannot choose between
them, while the full-resolution fine pass can.

Distance evaluations (image-orientation pairs compared) are ``n K_c + sum_c |G_c| |N(c)|``
instead of ``n K`` (``G_c``: the images with candidate ``c``); they are counted and returned.
Ties go to the lower fine index and nothing depends on batch sizes or on the rank, so the
result is deterministic; it equals the exhaustive match whenever the exhaustive best fine
orientation lies in the neighbour list of one of the image's ``k`` coarse candidates.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from spinifel.geometry.orientations import grid_spacing, orientation_grid
from spinifel.orientation.matching import MatchState, apply_transform


def _pair_distances(cross: np.ndarray, image_sq: np.ndarray, slice_sq: np.ndarray,
                    scale_per_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances and fitted scales of every (image, slice) pair of one GEMM block.

    The same arithmetic, in the same order, as :func:`spinifel.orientation.matching.update_matches`, so
    a pair gets the same distance in both searches whenever the GEMM gives the same ``x.y``.

    Parameters
    ----------
    cross : ndarray (n, B)
        ``x.y`` of each pair.
    image_sq : ndarray (n,) float64
        ``||x||^2``.
    slice_sq : ndarray (B,) float64
        ``||y||^2``.

    Returns
    -------
    (dist (n, B) float64, scale (n, B) float64 or None without ``scale_per_image``)
    """
    if scale_per_image:
        pos = np.maximum(cross, 0).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(slice_sq > 0, pos * pos / slice_sq, 0.0)
            scale = np.where(slice_sq > 0, pos / slice_sq, 0.0)
        return image_sq[:, None] - gain, scale
    return image_sq[:, None] + (slice_sq[None, :] - 2.0 * cross), None


@dataclass
class TopK:
    """The ``k`` nearest orientations of each image, nearest first.

    Attributes
    ----------
    index : ndarray (n_images, k) int64
        Grid indices (-1 = none yet), sorted by distance, ties by the lower index.
    dist : ndarray (n_images, k) float64
        Their squared distances (inf = none yet).
    """

    index: np.ndarray
    dist: np.ndarray

    @classmethod
    def empty(cls, n_images: int, k: int) -> TopK:
        return cls(np.full((n_images, k), -1, dtype=np.int64), np.full((n_images, k), np.inf))


def _select_k(dist: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` smallest ``(dist, index)`` pairs in lexicographic order.

    ``argpartition`` finds the ``k`` smallest distances; only rows where a tie straddles the
    k-th value (rare with float distances) are fully sorted, so the choice among equal
    distances is always the lower index, whatever order the candidates arrived in.
    """
    n = dist.shape[0]
    rows = np.arange(n)[:, None]
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    kth = dist[rows, part].max(axis=1)
    ambiguous = np.count_nonzero(dist <= kth[:, None], axis=1) > k
    if np.any(ambiguous):
        amb = np.flatnonzero(ambiguous)
        order = np.lexsort((index[amb], dist[amb]), axis=-1)[:, :k]
        part[amb] = order
    d, i = dist[rows, part], index[rows, part]
    order = np.lexsort((i, d), axis=-1)
    return d[rows, order], i[rows, order]


def update_top_k(top: TopK, images: np.ndarray, image_sq: np.ndarray, slices: np.ndarray,
                 offset: int, scale_per_image: bool = False, image_batch: int = 4096) -> None:
    """Fold one batch of model slices into the running ``k`` nearest (in place).

    Parameters
    ----------
    top : TopK
        Updated in place.
    images : ndarray (n_images, P)
        Images (already transformed).
    image_sq : ndarray (n_images,) float64
        ``||x||^2``.
    slices : ndarray (B, P)
        Model slices of grid orientations ``offset .. offset + B - 1`` (transformed).
    """
    slices = np.asarray(slices, dtype=images.dtype)
    slice_sq = np.einsum("bp,bp->b", slices, slices, dtype=np.float64)
    k = top.index.shape[1]
    gidx = np.arange(offset, offset + slices.shape[0], dtype=np.int64)
    for a in range(0, images.shape[0], image_batch):
        b = min(a + image_batch, images.shape[0])
        dist, _ = _pair_distances(images[a:b] @ slices.T, image_sq[a:b], slice_sq, scale_per_image)
        d = np.concatenate([top.dist[a:b], dist], axis=1)
        i = np.concatenate([top.index[a:b], np.broadcast_to(gidx, dist.shape)], axis=1)
        # an empty slot (-1, inf) must never beat a real orientation at inf distance
        i = np.where(np.isinf(d) & (i < 0), np.iinfo(np.int64).max, i)
        top.dist[a:b], sel = _select_k(d, i, k)
        top.index[a:b] = np.where(sel == np.iinfo(np.int64).max, -1, sel)


def top_k_matches(images: np.ndarray, slice_batches: Iterable[tuple[int, np.ndarray]], k: int,
                  scale_per_image: bool = False, image_batch: int = 4096,
                  transform: str = "none") -> TopK:
    """The ``k`` nearest model slices of every image over a stream of slice batches.

    Same distance as :func:`spinifel.orientation.matching.match_orientations`; with ``k = 1`` the same
    result. Memory ``O(n k)`` besides one GEMM block.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    images = apply_transform(images, transform)
    image_sq = np.einsum("np,np->n", images, images, dtype=np.float64)
    top = TopK.empty(images.shape[0], k)
    for offset, slices in slice_batches:
        update_top_k(top, images, image_sq, apply_transform(slices, transform), offset,
                     scale_per_image, image_batch)
    return top


def grid_neighbours(coarse: np.ndarray, fine: np.ndarray, radius: float,
                    block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Fine orientations within ``radius`` (radians) of each coarse orientation.

    The misorientation of unit quaternions ``a`` and ``b`` is ``2 arccos |a.b|`` (``q`` and
    ``-q`` are one rotation), as in :func:`~spinifel.geometry.orientations.angle_between`.

    Parameters
    ----------
    coarse : ndarray (K_c, 4)
    fine : ndarray (K, 4)
        Unit quaternions.
    radius : float
        Radians.

    Returns
    -------
    (indptr (K_c + 1,) int64, indices (nnz,) int64)
        CSR lists: the neighbours of coarse ``c`` are ``indices[indptr[c]:indptr[c + 1]]``,
        ascending fine indices.
    """
    coarse = np.asarray(coarse, dtype=np.float64)
    fine = np.asarray(fine, dtype=np.float64)
    counts = np.zeros(len(coarse), dtype=np.int64)
    parts = []
    for a in range(0, len(coarse), block):
        dots = np.abs(coarse[a:a + block] @ fine.T)
        near = 2.0 * np.arccos(np.clip(dots, 0.0, 1.0)) <= radius
        r, c = np.nonzero(near)  # row-major: per coarse row, ascending fine index
        counts[a:a + block] = np.bincount(r, minlength=near.shape[0])
        parts.append(c.astype(np.int64))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def twin_axis(positions: np.ndarray) -> np.ndarray:
    """The beam axis as seen by the pixels: the normal of the plane through the origin that
    best fits the reciprocal pixel positions ``(3, P)`` (least squares), a unit 3-vector.

    The pixels lie on the Ewald sphere through the origin, nearly a plane normal to the
    beam at these resolutions.
    """
    p = np.asarray(positions, dtype=np.float64)
    _, vecs = np.linalg.eigh(p @ p.T)
    axis = vecs[:, 0]  # smallest eigenvalue: least spread
    return axis * (1.0 if axis[np.argmax(np.abs(axis))] > 0 else -1.0)


def twin_rotation(axis) -> np.ndarray:
    """Quaternion of the half turn about ``axis`` (unit 3-vector): ``[0, axis]``.

    For pixels in the plane normal to ``axis`` the half turn maps ``s`` to ``-s``, and the
    intensity is centrosymmetric (Friedel), so orientations ``q`` and ``q * t`` give the same
    image up to the Ewald sphere's curvature, which is smallest at the inner pixels the
    coarse pass uses: the coarse pass cannot tell these twins apart.
    """
    a = np.asarray(axis, dtype=np.float64)
    return np.concatenate([[0.0], a / np.linalg.norm(a)])


def search_lists(coarse: np.ndarray, fine: np.ndarray, radius: float,
                 axis=None) -> tuple[np.ndarray, np.ndarray]:
    """Fine-grid search lists of the coarse orientations (CSR, as :func:`grid_neighbours`).

    Row ``c`` lists the fine orientations within ``radius`` of coarse ``c``; with ``axis``
    rows ``K_c + c`` follow, listing those within ``radius`` of its twin ``c * t``
    (:func:`twin_rotation`).
    """
    from spinifel.geometry.orientations import multiply

    centres = np.asarray(coarse, dtype=np.float64)
    if axis is not None:
        centres = np.concatenate([centres, multiply(centres, twin_rotation(axis)[None, :])])
    return grid_neighbours(centres, fine, radius)


@functools.lru_cache(maxsize=4)
def search_grids(n_fine: int, n_coarse: int, radius_spacings: float,
                 axis: tuple[float, float, float] | None = None):
    """Fine and coarse super-Fibonacci grids and the search lists (cached: fixed per run).

    ``radius_spacings`` is the neighbour radius in units of the coarse grid spacing
    :func:`~spinifel.geometry.orientations.grid_spacing` ``(n_coarse)``; ``axis``: the twin
    axis (:func:`search_lists`), or None for no twin lists.

    Returns
    -------
    (fine (K, 4), coarse (K_c, 4), indptr, indices)
    """
    fine, coarse = orientation_grid(n_fine), orientation_grid(n_coarse)
    indptr, indices = search_lists(coarse, fine, radius_spacings * grid_spacing(n_coarse), axis)
    for x in (fine, coarse, indptr, indices):
        x.setflags(write=False)
    return fine, coarse, indptr, indices


@dataclass
class SearchStats:
    """What a coarse-to-fine search compared.

    Attributes
    ----------
    coarse_evaluations, fine_evaluations : int
        Image-orientation distances computed in each pass (``n K_c`` and
        ``sum_c |G_c| |N(c)|``); ``evaluations`` is their sum and ``exhaustive_evaluations``
        ``n K``, the count of exhaustive matching on the fine grid.
    coarse_pixels, fine_pixels : int
        Pixels per distance in each pass.
    fine_sliced : int
        Fine orientations sliced (the union of the neighbour lists of all candidates).
    timings : dict
        Seconds: coarse_slicing, coarse_matching, fine_slicing, fine_matching.
    """

    coarse_evaluations: int = 0
    fine_evaluations: int = 0
    exhaustive_evaluations: int = 0
    coarse_pixels: int = 0
    fine_pixels: int = 0
    fine_sliced: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        return self.coarse_evaluations + self.fine_evaluations

    @property
    def reduction(self) -> float:
        """Exhaustive evaluations / evaluations (how many times fewer)."""
        return self.exhaustive_evaluations / max(self.evaluations, 1)


def match_coarse_to_fine(images: np.ndarray, slicer, coarse_slicer, coarse_pixels: np.ndarray,
                         fine_grid: np.ndarray, coarse_grid: np.ndarray, indptr: np.ndarray,
                         indices: np.ndarray, n_candidates: int, batch: int,
                         scale_per_image: bool = False, image_batch: int = 4096,
                         transform: str = "none", twins: bool = False,
                         max_fine_slices: int = 0) -> tuple[MatchState, SearchStats]:
    """Nearest fine-grid model slice of every image by the two-pass search (module doc).

    Parameters
    ----------
    images : ndarray (n_images, P)
        Local images over the matching pixels (untransformed).
    slicer : spinifel.orientation.slicing.Slicer
        Model at the same ``P`` pixels (fine pass).
    coarse_slicer : spinifel.orientation.slicing.Slicer
        Model at the pixels ``coarse_pixels`` (coarse pass).
    coarse_pixels : ndarray (P_c,) int
        Columns of ``images`` used in the coarse pass.
    fine_grid : ndarray (K, 4)
    coarse_grid : ndarray (K_c, 4)
    indptr, indices : ndarray
        Search lists of the coarse orientations in the fine grid (:func:`search_lists`):
        ``K_c`` rows, or ``2 K_c`` with ``twins``.
    n_candidates : int
        Coarse orientations kept per image (``k``).
    batch : int
        Orientations sliced per batch (bounds the NUFFT memory).
    twins : bool
        Also search around the half-turn twin of every candidate (rows ``K_c + c`` of the
        lists).
    max_fine_slices : int
        Most fine slices held at once (0 = no limit). When the candidates need more, their
        search lists are processed in chunks of nearby orientations, each chunk's slices
        computed and dropped in turn (a slice shared by two chunks is computed twice); the
        result is the same, the memory bounded whatever the grid size.

    Returns
    -------
    (MatchState, SearchStats)
        ``best_index`` indexes ``fine_grid``; ties go to the lower fine index.
    """
    n, P = images.shape
    kc = len(coarse_grid)
    if not 1 <= n_candidates <= kc:
        raise ValueError(f"n_candidates must be in [1, {kc}], got {n_candidates}")
    if len(indptr) != (2 if twins else 1) * kc + 1:
        raise ValueError(f"search lists have {len(indptr) - 1} rows, expected "
                         f"{(2 if twins else 1) * kc} for {kc} coarse orientations (twins={twins})")
    stats = SearchStats(exhaustive_evaluations=n * len(fine_grid), coarse_pixels=len(coarse_pixels),
                        fine_pixels=P)
    tm = stats.timings

    # coarse pass: top-k on the inner pixels
    x_c = apply_transform(np.ascontiguousarray(images[:, coarse_pixels]), transform)
    sq_c = np.einsum("np,np->n", x_c, x_c, dtype=np.float64)
    top = TopK.empty(n, n_candidates)
    for start in range(0, kc, batch):
        t = time.perf_counter()
        sl = apply_transform(coarse_slicer.slices(coarse_grid[start:start + batch]), transform)
        t1 = time.perf_counter()
        update_top_k(top, x_c, sq_c, sl, start, scale_per_image, image_batch)
        tm["coarse_slicing"] = tm.get("coarse_slicing", 0.0) + t1 - t
        tm["coarse_matching"] = tm.get("coarse_matching", 0.0) + time.perf_counter() - t1
    stats.coarse_evaluations = n * kc
    del x_c

    # group the images by search list: image i is in G_c for each of its k candidates c
    # (and their twins, rows K_c + c)
    t = time.perf_counter()
    cand = np.concatenate([top.index, top.index + kc], axis=1) if twins else top.index
    img = np.repeat(np.arange(n, dtype=np.int64), cand.shape[1])
    cand = cand.ravel()
    order = np.argsort(cand, kind="stable")  # stable: images ascending within a group
    cand, img = cand[order], img[order]
    used, starts = np.unique(cand, return_index=True)
    ends = np.append(starts[1:], len(cand))
    tm["fine_matching"] = time.perf_counter() - t
    x = apply_transform(images, transform)
    x_sq = np.einsum("np,np->n", x, x, dtype=np.float64)
    state = MatchState.empty(n)
    fine_evals = 0
    stats.fine_sliced = 0
    group_of = dict(zip(used.tolist(), zip(starts.tolist(), ends.tolist())))
    for chunk in _chunks(used, indptr, indices, fine_grid, max_fine_slices):
        need = np.unique(np.concatenate([indices[indptr[c]:indptr[c + 1]] for c in chunk]))
        stats.fine_sliced += len(need)
        # the fine slices this chunk needs, each computed once (in batches)
        t = time.perf_counter()
        y = np.empty((len(need), P), dtype=images.dtype)
        for s in range(0, len(need), batch):
            y[s:s + batch] = apply_transform(slicer.slices(fine_grid[need[s:s + batch]]),
                                             transform)
        y_sq = np.einsum("bp,bp->b", y, y, dtype=np.float64)
        tm["fine_slicing"] = tm.get("fine_slicing", 0.0) + time.perf_counter() - t
        # fine pass: one GEMM per coarse candidate, its images against its neighbours
        t = time.perf_counter()
        for c in chunk:
            a0, a1 = group_of[c]
            nb = indices[indptr[c]:indptr[c + 1]]
            rows_y = np.searchsorted(need, nb)
            fine_evals += _fine_pass(state, img[a0:a1], nb, x, x_sq, y[rows_y], y_sq[rows_y],
                                     scale_per_image, image_batch)
        tm["fine_matching"] += time.perf_counter() - t
        del y
    stats.fine_evaluations = int(fine_evals)
    # Only possible when every candidate of an image has an empty neighbour list (a radius
    # below the fine grid's covering radius); the configured radius (>= 0.5 coarse
    # spacings, coarse grid <= half the fine one) rules it out.
    lost = state.best_index < 0
    if np.any(lost):
        raise ValueError(f"{int(lost.sum())} images found no fine orientation: the neighbour "
                         "radius is too small for the coarse grid")
    return state, stats


def _fine_pass(state: MatchState, group: np.ndarray, nb: np.ndarray, x: np.ndarray,
               x_sq: np.ndarray, yc: np.ndarray, yc_sq: np.ndarray, scale_per_image: bool,
               image_batch: int) -> int:
    """Match the images ``group`` (rows of ``x``) against the fine slices ``yc`` of the
    fine orientations ``nb`` (ascending), one GEMM per image batch; update ``state`` where
    better (ties to the lower fine index). Returns the distance evaluations done."""
    if len(nb) == 0:
        return 0
    for g0 in range(0, len(group), image_batch):
        rows = group[g0:g0 + image_batch]
        dist, scale = _pair_distances(x[rows] @ yc.T, x_sq[rows], yc_sq, scale_per_image)
        j = np.argmin(dist, axis=1)  # nb ascending: ties -> lower fine index
        r = np.arange(len(rows))
        d, gidx = dist[r, j], nb[j]
        sc = scale[r, j] if scale is not None else np.ones(len(rows))
        cur_d, cur_i = state.best_dist[rows], state.best_index[rows]
        better = (d < cur_d) | ((d == cur_d) & (gidx < cur_i))
        state.best_index[rows[better]] = gidx[better]
        state.best_dist[rows[better]] = d[better]
        state.best_scale[rows[better]] = sc[better]
    return len(group) * len(nb)


def _chunks(rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray, fine_grid: np.ndarray,
            max_slices: int) -> list[np.ndarray]:
    """Split search rows into chunks whose fine neighbours number at most ``max_slices``.

    Rows are taken in an order of their position on SO(3) (the first neighbour's
    quaternion, upper hemisphere, on cells of 0.25), so that a chunk's rows share many
    neighbours. One row whose list alone exceeds the limit is a chunk of its own. With
    ``max_slices <= 0`` or when everything fits, one chunk holds all rows.
    """
    if max_slices <= 0 or len(rows) == 0:
        return [rows]
    total = np.unique(np.concatenate([indices[indptr[c]:indptr[c + 1]] for c in rows]))
    if len(total) <= max_slices:
        return [rows]
    first = np.array([indices[indptr[c]] if indptr[c + 1] > indptr[c] else 0 for c in rows])
    q = fine_grid[first].copy()
    q[q[:, 0] < 0] *= -1
    cell = np.floor(q[:, 1:] / 0.25).astype(np.int64)
    order = np.lexsort((rows, cell[:, 2], cell[:, 1], cell[:, 0]))
    held = np.zeros(len(fine_grid), dtype=bool)
    chunks, current, count = [], [], 0
    for c in rows[order]:
        nb = indices[indptr[c]:indptr[c + 1]]
        new = nb[~held[nb]]
        if current and count + len(new) > max_slices:
            chunks.append(np.array(current))
            held[:] = False
            current, count = [], 0
            new = nb
        current.append(c)
        held[new] = True
        count += len(new)
    if current:
        chunks.append(np.array(current))
    return chunks


def coarse_pixel_selection(positions: np.ndarray, fraction: float,
                           s_max: float | None = None) -> np.ndarray:
    """Indices of the pixels with ``|s| <= fraction * s_max`` (the coarse pass's pixels).

    ``s_max`` defaults to the largest ``|s|`` of ``positions`` (3, P).
    """
    s = np.linalg.norm(np.asarray(positions, dtype=np.float64), axis=0)
    return np.flatnonzero(s <= fraction * (s.max() if s_max is None else s_max))


def default_coarse_size(n_orientations: int) -> int:
    """Coarse grid size used when ``algorithm.coarse_n_orientations = 0``: ``K / 8``, >= 10."""
    return max(10, n_orientations // 8)


def match_with_config(images: np.ndarray, autocorrelation: np.ndarray, positions: np.ndarray,
                      reciprocal_extent: float, slicer, a, dtype, threads: int,
                      timings: dict | None = None) -> tuple[MatchState, SearchStats]:
    """Coarse-to-fine matching with the settings of ``a`` (an ``AlgorithmConfig``).

    Builds the coarse-pass slicer on the pixels of ``positions`` (those of ``images``) with
    ``|s|`` up to ``a.coarse_resolution * reciprocal_extent``: a fraction of the detector's
    largest ``|s|``, so a generation that already matches at low resolution (resolution
    marching) keeps all its pixels in the coarse pass rather than a fraction of them. Uses
    the cached grids and neighbour lists. The slicing time of both passes is added to
    ``timings["slicing"]``.
    """
    from spinifel.orientation.slicing import Slicer

    n_coarse = a.coarse_n_orientations or default_coarse_size(a.n_orientations)
    # rounded: the cache key must not change with the round-off of the pixel subset
    axis = tuple(np.round(twin_axis(positions), 6)) if a.coarse_twins else None
    fine, coarse, indptr, indices = search_grids(a.n_orientations, n_coarse, a.coarse_radius, axis)
    cpix = coarse_pixel_selection(positions, a.coarse_resolution, reciprocal_extent)
    cslicer = Slicer(autocorrelation, positions[:, cpix], reciprocal_extent, a.nufft_eps_slicing,
                     dtype, threads)
    state, stats = match_coarse_to_fine(images, slicer, cslicer, cpix, fine, coarse, indptr, indices,
                                        a.coarse_candidates, a.orientation_batch, a.scale_per_image,
                                        a.image_batch, a.match_transform, a.coarse_twins,
                                        a.coarse_max_fine_slices)
    if timings is not None:
        timings["slicing"] = (timings.get("slicing", 0.0) + stats.timings["coarse_slicing"]
                              + stats.timings["fine_slicing"])
    return state, stats
