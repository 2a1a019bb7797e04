"""Poisson likelihood of photon-count images and streaming orientation posteriors (EMC-style).

Score
-----
For a photon-count image ``K_k`` (good pixels only) and the model slice ``W_j`` (expected
photons per pixel at orientation ``j``, fluence 1) the Poisson log-likelihood with the
image's fluence ``phi_k`` is, up to terms constant in ``j`` (``-sum_p log K_kp!`` and
``N_k log phi_k``, dropped)::

    L_kj = sum_p K_kp log W_jp - phi_k S_j,        S_j = sum_p W_jp.

The first term is one GEMM of the images with the log-slices, computed in the same batches
as :mod:`spinifel.orientation.matching` (image blocks x orientation batches), so memory does not grow
with the number of orientations. ``W`` is clipped below at ``floor_rel`` times the slice's
mean (:func:`log_slices`): a pixel the model predicts empty but where a photon landed then
costs a finite ``log(floor)`` instead of ``-inf``, and a slightly negative merged intensity
(Tikhonov solutions can dip below 0) is scored as "very dim". ``S_j`` is the sum of the
clipped slice, so the score is the exact Poisson likelihood of the clipped model.

Fluence (``fit_scale=False``, EMC): the first generation takes
``phi_k = N_k / mean_j S_j`` (photon count ratio, :func:`initial_fluence`); afterwards
``phi_k = N_k / sum_j P_kj S_j`` (:func:`update_fluence`), the maximiser of the expected
log-likelihood ``sum_j P_kj L_kj`` over ``phi_k``, with the posterior expectation over ALL
orientations (streamed exactly by :class:`PosteriorState`).

Fitted scale (``fit_scale=True``): ``phi_kj = N_k / S_j`` maximises ``L_kj`` per pair,
giving ``L_kj = sum_p K_kp log W_jp - N_k log S_j`` (+ terms constant in ``j``). It is
blind to the slice's total brightness and uses only its shape.

Posterior
---------
``P_kj = exp(beta L_kj) / sum_j' exp(beta L_kj')`` with an inverse temperature ``beta``
(:func:`beta_schedule`). :class:`PosteriorState` streams over orientation batches keeping
per image a running log-sum-exp over all orientations, the running sums that give the exact
entropy and expected slice sum, and the top ``max_kept`` scores. :meth:`PosteriorState.finalize`
keeps, per image, the smallest prefix of the top scores carrying ``posterior_mass`` of the
total mass and renormalises the kept weights to sum to 1 (the merge then gives every image
the same total weight, as a hard assignment does); the mass dropped (beyond the prefix and
beyond the top ``max_kept``) is recorded. Hard assignment is ``max_kept = 1``: the argmax of
``L`` (ties to the lower orientation index) with weight 1.

Everything follows the array module of the images (numpy, or cupy on a GPU). On the CPU the
streaming passes run compiled (:mod:`spinifel.orientation.posterior_kernels`, numba) when
numba imports; the numpy passes are the reference they are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module
from spinifel.errors import DatasetError

# Model values below this fraction of their slice's mean are raised to it before the log.
DEFAULT_FLOOR_REL = 1e-3

# Rows per block of the streaming posterior's passes: blocks of about this many float64
# entries (128 KiB) keep its buffers in the L2 cache of the CPUs measured here.
_BLOCK_ELEMENTS = 16384

# The CPU folds run compiled (numba) when it imports; the tests compare both paths.
USE_COMPILED = True
_KERNELS: Any = None


def compiled_kernels() -> Any:
    """The numba passes of :class:`PosteriorState` (module
    :mod:`spinifel.orientation.posterior_kernels`), or None where numba cannot be imported
    or ``USE_COMPILED`` is False (then the numpy passes run; cupy arrays always take them)."""
    global _KERNELS
    if not USE_COMPILED:
        return None
    if _KERNELS is None:
        try:
            from spinifel.orientation import posterior_kernels
        except ImportError:  # numba missing on this platform: the numpy passes
            _KERNELS = False
        else:
            _KERNELS = posterior_kernels
    return _KERNELS or None


def log_slices(slices: Any, floor_rel: float = DEFAULT_FLOOR_REL,
               column_sums: Any = None) -> tuple[Any, Any]:
    """Log of model slices clipped at a floor relative to each slice's mean, and their sums.

    Parameters
    ----------
    slices : array (B, P) float32/float64
        Expected photons per good pixel of ``B`` orientations (fluence 1).
    floor_rel : float
        Floor as a fraction of the slice's mean over its pixels, ``> 0``. A slice whose
        mean is not positive is floored at ``floor_rel`` absolute (an empty model).
    column_sums : array (P,) float64 or None
        When given, the (unclipped) slices are added to it in place, in the same pass.

    Returns
    -------
    log_w : array (B, P), dtype of ``slices``
        ``log(max(W, floor_rel * mean(W)))``.
    sums : array (B,) float64
        ``S_j``: the sum of the clipped slice.
    """
    xp = get_array_module(slices)
    kern = compiled_kernels() if xp is np else None
    if kern is not None and slices.ndim == 2 and slices.dtype in (np.float32, np.float64):
        w = np.empty_like(slices, order="C")
        cols = np.empty(0) if column_sums is None else column_sums
        sums = kern.clip_rows(np.ascontiguousarray(slices), float(floor_rel), w, cols)
        return np.log(w, out=w), sums
    if column_sums is not None:
        column_sums += xp.sum(slices, axis=0, dtype=np.float64)
    mean = xp.mean(slices, axis=1, dtype=np.float64)
    floor = floor_rel * xp.where(mean > 0, mean, 1.0)
    w = xp.maximum(slices, floor[:, None].astype(slices.dtype))
    sums = xp.sum(w, axis=1, dtype=np.float64)
    return xp.log(w, out=w), sums  # in place: one (B, P) array, not two


def poisson_scores(images: Any, log_w: Any, slice_sums: Any, *, fluence: Any = None,
                   n_photons: Any = None, fit_scale: bool = False) -> Any:
    """Poisson log-likelihood ``L`` of every image against every slice of one batch.

    Parameters
    ----------
    images : array (n, P) float32/float64
        Photon counts at the good pixels.
    log_w, slice_sums : from :func:`log_slices` (same dtype as ``images``)
    fluence : array (n,) float64
        ``phi_k`` (required unless ``fit_scale``).
    n_photons : array (n,) float64
        ``N_k = sum_p K_kp`` (required with ``fit_scale``).
    fit_scale : bool
        Score with the per-pair fitted fluence (``- N_k log S_j``) instead of ``- phi_k S_j``.

    Returns
    -------
    array (n, B) float64
        The GEMM ``K log W^T`` (accumulated in the images' dtype) minus the fluence term.
    """
    xp = get_array_module(images, log_w)
    gemm = images @ log_w.T  # (n, B) GEMM, dominates the cost
    a, c = _fluence_term(slice_sums, fluence, n_photons, fit_scale)
    return xp.subtract(gemm, a[:, None] * c[None, :], dtype=np.float64)


def _fluence_term(slice_sums: Any, fluence: Any, n_photons: Any,
                  fit_scale: bool) -> tuple[Any, Any]:
    """The score's term in ``j`` as an outer product ``a_k c_j`` (float64): ``phi_k S_j``,
    or ``N_k log S_j`` with the fitted scale."""
    xp = get_array_module(slice_sums)
    if fit_scale:
        return xp.asarray(n_photons, dtype=np.float64), xp.log(slice_sums)
    return xp.asarray(fluence, dtype=np.float64), xp.asarray(slice_sums, dtype=np.float64)


def candidate_log_likelihood(images: Any, slices: Any, n_per_image: int, *,
                             fluence: Any = None, fit_scale: bool = False,
                             floor_rel: float = DEFAULT_FLOOR_REL,
                             background_per_fluence: Any = None) -> Any:
    """Poisson log-likelihood of each image against its own candidate slices.

    The score of :func:`score_orientations` (same floor, fluence and background terms) for
    local refinement, where every image has its own orientations instead of a shared grid.

    Parameters
    ----------
    images : array (n, P) float32/float64
        Photon counts at the good pixels.
    slices : array (n * n_per_image, P)
        Model slices (expected photons, fluence 1), image-major: rows
        ``i * n_per_image .. (i + 1) * n_per_image - 1`` belong to image ``i``.
    n_per_image : int
        Candidates per image ``k``.
    fluence : array (n,) float64
        ``phi_k`` (required unless ``fit_scale``).
    fit_scale : bool
        Per-pair fitted fluence (``- N_k log S``) instead of ``- phi_k S``.
    background_per_fluence : array (P,) or None
        Added to every slice before the log, as in :func:`score_orientations`.

    Returns
    -------
    array (n, k) float64
        ``L`` (terms constant per image dropped, as in :func:`poisson_scores`), accumulated
        in float64: candidates a fraction of a degree apart differ by a few units of ``L``.
    """
    xp = get_array_module(images, slices)
    n = images.shape[0]
    w = xp.asarray(slices, dtype=np.float64)
    if background_per_fluence is not None:
        w = w + xp.asarray(background_per_fluence, dtype=np.float64)[None, :]
    log_w, sums = log_slices(w, floor_rel)
    k64 = xp.asarray(images, dtype=np.float64)
    out = xp.einsum("np,nkp->nk", k64, log_w.reshape(n, n_per_image, -1))
    sums = sums.reshape(n, n_per_image)
    if fit_scale:
        out -= xp.sum(k64, axis=1)[:, None] * xp.log(sums)
    else:
        if fluence is None:
            raise ValueError("fluence is required unless fit_scale")
        out -= xp.asarray(fluence, dtype=np.float64)[:, None] * sums
    return out


def initial_fluence(n_photons: Any, mean_slice_sum: float) -> Any:
    """First-generation fluence ``phi_k = N_k / mean_j S_j`` (photon count ratio).

    ``mean_slice_sum`` is ``Posterior.mean_slice_sum`` of an earlier scoring or, in the
    first one, the mean of ``S_j`` over a sample of orientations (e.g. the first batch).
    """
    return n_photons / float(mean_slice_sum)


def update_fluence(n_photons: Any, expected_slice_sum: Any) -> Any:
    """EMC fluence ``phi_k = N_k / sum_j P_kj S_j`` (``Posterior.expected_slice_sum``)."""
    xp = get_array_module(n_photons, expected_slice_sum)
    s = xp.asarray(expected_slice_sum)
    return xp.where(s > 0, n_photons / xp.where(s > 0, s, 1.0), 0.0)


@dataclass
class Posterior:
    """Sparse orientation posterior of each local image (all arrays on one module).

    Attributes
    ----------
    indices : array (n, k) int64
        Kept orientation indices into the grid, best first; ``-1`` past ``n_kept``.
    weights : array (n, k) float64
        Their probabilities renormalised over the kept ones (sum 1 per image); 0 past ``n_kept``.
    n_kept : array (n,) int64
        Number of kept orientations (1 .. k).
    log_likelihood : array (n,) float64
        ``L`` of the best orientation (terms constant in ``j`` dropped, see module doc).
    entropy : array (n,) float64
        Entropy (nats) of the full posterior over all ``n_orientations``.
    dropped_mass : array (n,) float64
        Posterior mass outside the kept set, before renormalisation.
    expected_slice_sum : array (n,) float64
        ``sum_j P_kj S_j`` over all orientations (full posterior).
    fluence : array (n,) float64
        The fluence ``phi_k`` the scores used (``N_k / expected_slice_sum`` with ``fit_scale``).
    n_orientations : int
        ``J``, the number of orientations scored.
    mean_slice_sum : float
        ``mean_j S_j`` over all orientations (the next first-generation fluence reference).
    beta : float
        Inverse temperature used.
    mean_slice : array (P,) float64 or None
        The model slices (without background) averaged over all orientations scored: the
        orientation-averaged intensity ``<W>_p`` of :mod:`spinifel.orientation.background`.
    """

    indices: Any
    weights: Any
    n_kept: Any
    log_likelihood: Any
    entropy: Any
    dropped_mass: Any
    expected_slice_sum: Any
    fluence: Any
    n_orientations: int
    mean_slice_sum: float
    beta: float
    mean_slice: Any = None

    def mutual_information(self) -> Any:
        """EMC's information rate per image, ``sum_j P_kj log(P_kj J) = log J - H_k`` (nats)."""
        return math.log(self.n_orientations) - self.entropy

    def summary(self) -> dict[str, float]:
        """Local sums for the per-generation metrics (reduce over ranks, then divide by n).

        Keys: ``n`` (images), ``log_likelihood``, ``entropy``, ``mutual_information``,
        ``n_kept``, ``dropped_mass``, ``fluence`` (sums over the local images) and
        ``n_kept_max`` (a maximum: reduce it with MAX, see
        :func:`spinifel.parallel.collectives.reduce_summary`). Turn the reduced sums into
        the metrics with :func:`posterior_metrics`.
        """
        xp = get_array_module(self.weights)
        n = self.indices.shape[0]
        vals = xp.stack([xp.sum(self.log_likelihood), xp.sum(self.entropy),
                         xp.sum(self.mutual_information()),
                         xp.sum(self.n_kept).astype(np.float64), xp.sum(self.dropped_mass),
                         xp.sum(xp.asarray(self.fluence, dtype=np.float64)),
                         (xp.max(self.n_kept) if n else xp.zeros((), np.int64)).astype(np.float64)])
        v = to_module(vals, np)
        return {"n": float(n), "log_likelihood": float(v[0]), "entropy": float(v[1]),
                "mutual_information": float(v[2]), "n_kept": float(v[3]),
                "dropped_mass": float(v[4]), "fluence": float(v[5]), "n_kept_max": float(v[6])}


def posterior_metrics(sums: dict[str, float], beta: float) -> dict[str, float]:
    """Per-generation metrics from the :meth:`Posterior.summary` sums over ALL ranks.

    Parameters
    ----------
    sums : dict
        :meth:`Posterior.summary` reduced over the ranks (sums, and the maximum for
        ``n_kept_max``; :func:`spinifel.parallel.collectives.reduce_summary`).
    beta : float
        Inverse temperature of the generation (the same on every rank).

    Returns
    -------
    dict
        ``log_likelihood`` (mean over images of ``L`` at the best orientation),
        ``entropy`` (mean posterior entropy, nats), ``mutual_information`` (mean
        ``log J - H``, nats: EMC's information rate), ``beta``, ``orientations_kept_mean``,
        ``orientations_kept_max``, ``dropped_mass`` (mean), ``fluence`` (mean), ``n_images``.
    """
    n = sums["n"]
    if not n > 0:
        raise ValueError("posterior_metrics needs at least one image over all ranks")
    return {"log_likelihood": sums["log_likelihood"] / n, "entropy": sums["entropy"] / n,
            "mutual_information": sums["mutual_information"] / n, "beta": float(beta),
            "orientations_kept_mean": sums["n_kept"] / n,
            "orientations_kept_max": sums["n_kept_max"], "dropped_mass": sums["dropped_mass"] / n,
            "fluence": sums["fluence"] / n, "n_images": n}


def _sort_desc(scores: Any, idx: Any) -> tuple[Any, Any]:
    """Rows sorted by descending score, ties to the lower index."""
    xp = get_array_module(scores)
    order = xp.argsort(-scores, axis=1)  # one unstable sort: real-valued scores rarely tie
    s, i = xp.take_along_axis(scores, order, 1), xp.take_along_axis(idx, order, 1)
    tied = xp.nonzero(xp.any((s[:, 1:] == s[:, :-1]) & (s[:, 1:] > -xp.inf), axis=1))[0]
    if tied.size:  # rows with exact ties: index order first, then a stable sort by score
        o = xp.argsort(idx[tied], axis=1)
        ts, ti = xp.take_along_axis(scores[tied], o, 1), xp.take_along_axis(idx[tied], o, 1)
        o = xp.argsort(-ts, axis=1, kind="stable")
        s[tied], i[tied] = xp.take_along_axis(ts, o, 1), xp.take_along_axis(ti, o, 1)
    return s, i


def _running_best(top_s: Any, top_i: Any, scores: Any, offset: int) -> tuple[Any, Any]:
    """Per row the largest of the running best ``(top_s, top_i)`` (n, 1) (index -1 when
    none) and a batch of ``scores`` (n, B) at indices ``offset ..``: the hard assignment,
    ties to the lower index (``argmax`` takes a batch's first maximum, then an explicit tie
    rule against the running best: batches may come in any order)."""
    xp = get_array_module(scores)
    j = xp.argmax(scores, axis=1)
    s_new = xp.take_along_axis(scores, j[:, None], 1)
    i_new = j[:, None].astype(np.int64) + offset
    better = (s_new > top_s) | ((s_new == top_s) & (i_new < top_i)) | (top_i < 0)
    return xp.where(better, s_new, top_s), xp.where(better, i_new, top_i)


def _largest(scores: Any, idx: Any, k: int) -> tuple[Any, Any]:
    """Per row the ``k`` largest scores in no particular order (``argpartition``; a tie
    exactly at the k-th place is broken arbitrarily: real-valued scores do not tie)."""
    xp = get_array_module(scores)
    if scores.shape[1] <= k:
        return scores, idx
    part = xp.argpartition(-scores, k - 1, axis=1)[:, :k]
    return xp.take_along_axis(scores, part, 1), xp.take_along_axis(idx, part, 1)


def _fold_top_k(top_s: Any, top_i: Any, fill: Any, bar: Any, scores: Any, offset: int,
                k: int, floor: Any = None) -> None:
    """Fold a batch of ``scores`` (n, B) at indices ``offset ..`` into per-row buffers that
    hold at least each row's ``k`` largest so far (in place).

    ``top_s``/``top_i`` (n, C), ``C >= 2k``: the first ``fill`` (n,) entries of a row are its
    candidates (unordered), the rest ``-inf``/-1. ``bar`` (n,): a score at or below it can no
    longer be among the row's ``k`` largest (the k-th largest at the row's last compaction;
    ``-inf`` before). Only the batch's entries above ``bar`` and above ``floor`` (n,) (scores
    that can never be kept) are appended; a row whose buffer would overflow is first compacted
    to its ``k`` largest (one ``argpartition`` of ``C`` entries, which raises its bar), so the
    partition cost is paid about once per ``C - k`` appended entries rather than once per
    batch, and an entry that cannot enter costs one comparison."""
    xp = get_array_module(scores)
    n, b = scores.shape
    cap = top_s.shape[1]
    lim = bar if floor is None else xp.maximum(bar, floor)
    above = scores > lim[:, None]
    cnt = xp.sum(above, axis=1)
    if n == 0 or int(xp.max(cnt)) == 0:
        return
    f0 = int(fill[0])
    if int(xp.min(cnt)) == b and f0 + b <= cap and bool(xp.all(fill == f0)):
        top_s[:, f0:f0 + b] = scores  # the whole batch enters every row (first batches)
        top_i[:, f0:f0 + b] = xp.arange(offset, offset + b, dtype=np.int64)[None, :]
        fill += b
        return
    over = xp.nonzero(fill + cnt > cap)[0]
    if over.size:  # compact these rows to their k largest, raise their bar, filter again
        ks, ki = _largest(top_s[over], top_i[over], k)
        top_s[over], top_i[over] = -xp.inf, -1
        top_s[over, :k], top_i[over, :k] = ks, ki
        fill[over] = xp.minimum(fill[over], k)
        bar[over] = xp.where(fill[over] >= k, xp.min(ks, axis=1), -xp.inf)
        lim_o = bar[over] if floor is None else xp.maximum(bar[over], floor[over])
        above[over] = scores[over] > lim_o[:, None]
        cnt[over] = xp.sum(above[over], axis=1)
        still = over[fill[over] + cnt[over] > cap]
        if still.size:  # more than C - k entries of one batch can enter: merge them whole
            cand = xp.where(above[still], scores[still], -xp.inf)
            idx = xp.broadcast_to(xp.arange(offset, offset + b, dtype=np.int64),
                                  (still.size, b))
            ks, ki = _largest(xp.concatenate([top_s[still, :k], cand], axis=1),
                              xp.concatenate([top_i[still, :k], idx], axis=1), k)
            top_s[still, :k], top_i[still, :k] = ks, ki
            fill[still] = k
            bar[still] = xp.min(ks, axis=1)
            above[still], cnt[still] = False, 0
    r, j = xp.nonzero(above)  # row-major: grouped by row
    pos = fill[r] + xp.arange(r.size) - (xp.cumsum(cnt) - cnt)[r]
    top_s[r, pos] = scores[r, j]
    top_i[r, pos] = j + offset
    fill += cnt


@dataclass
class PosteriorState:
    """Running per-image statistics of ``beta L`` while orientation batches stream by.

    Attributes (all ``(n, ...)`` on the images' array module)
    ----------
    beta : float
    max_kept : int, ``k``
    top_scores : (n, C) float64, ``L`` of candidates for the best ``k`` so far (``-inf`` when
        unfilled). ``C = 1`` for the hard assignment (``k = 1``: the running best); else
        ``C = 3k`` (a wider buffer is compacted less often: faster than 2k in the bench at
        k = 512, beta = 1e-3, where every score is in the race), unordered while
        streaming (:func:`_fold_top_k`: ``fill``, ``bar``);
        :meth:`finalize` keeps the ``k`` largest, sorted.
    top_index : (n, C) int64
    fill, bar : (n,) int64 and float64, the buffer's state (:func:`_fold_top_k`)
    run_max : (n,) float64, running max of ``beta L``
    run_sum : (n,) float64, ``sum_j exp(t_j)``, ``t_j = beta L_kj - run_max``
    run_t : (n,) float64, ``sum_j exp(t_j) t_j`` (entropy)
    run_s : (n,) float64, ``sum_j exp(t_j) S_j`` (expected slice sum)
    n_seen : int, orientations folded in; slice_sum_total : float, ``sum_j S_j``
    log_never_kept : float, ``log((1 - posterior_mass) / J)`` for ``J`` orientations in all
        (``-inf``: no pruning). An orientation whose probability is below
        ``(1 - posterior_mass) / J`` is never kept by :meth:`finalize` (all such ones together
        hold less than ``1 - posterior_mass``), and ``beta L - run_max`` below this log
        implies that, since ``log Z >= run_max``; such scores skip the top-k bookkeeping.
    """

    beta: float
    max_kept: int
    top_scores: Any
    top_index: Any
    fill: Any
    bar: Any
    run_max: Any
    run_sum: Any
    run_t: Any
    run_s: Any
    n_seen: int = 0
    slice_sum_total: float = 0.0
    log_never_kept: float = -np.inf

    @classmethod
    def empty(cls, n_images: int, max_kept: int, beta: float, xp: Any = np,
              posterior_mass: float = 1.0, n_orientations: int = 0) -> PosteriorState:
        """A state before any batch; with ``n_orientations`` (the ``J`` that will stream by)
        and ``posterior_mass < 1``, scores that :meth:`finalize` can never keep are pruned."""
        if max_kept < 1 or not beta > 0:
            raise ValueError(f"need max_kept >= 1 and beta > 0, got {max_kept}, {beta}")
        prune = (math.log((1.0 - posterior_mass) / n_orientations)
                 if n_orientations > 0 and posterior_mass < 1 else -np.inf)
        cap = 1 if max_kept == 1 else 3 * max_kept
        return cls(float(beta), int(max_kept), xp.full((n_images, cap), -np.inf),
                   xp.full((n_images, cap), -1, dtype=np.int64),
                   xp.zeros(n_images, dtype=np.int64), xp.full(n_images, -np.inf),
                   xp.full(n_images, -np.inf), xp.zeros(n_images), xp.zeros(n_images),
                   xp.zeros(n_images), log_never_kept=prune)

    def update(self, scores: Any, offset: int, slice_sums: Any, rows: slice = slice(None),
               count: bool = True, outer: tuple[Any, Any] | None = None) -> None:
        """Fold the scores ``(n_rows, B)`` of orientations ``offset .. offset + B - 1``.

        ``rows`` selects the images (an image block, a slice with a step of 1); ``count`` is
        False for every block after the first of the same orientation batch (``n_seen``
        counts orientations once). With ``outer = (a, c)``, ``a`` (n_rows,) and ``c`` (B,),
        the scores are ``scores - a[:, None] * c[None, :]`` in float64 (the GEMM and the
        fluence term of :func:`poisson_scores`), formed here block by block so that no
        ``(n_rows, B)`` float64 temporary is made. ``scores`` is not modified.

        On numpy the rows are processed in blocks of about ``_BLOCK_ELEMENTS`` entries
        with reused buffers: the exponentials and sums then run in cache, where whole-batch
        temporaries cost more in page faults than in arithmetic (measured 10x on
        1000 x 500 scores).
        """
        xp = get_array_module(scores)
        n, b = scores.shape
        start = rows.start or 0
        s_sums = xp.asarray(slice_sums, dtype=np.float64)
        kern = compiled_kernels() if xp is np else None
        if kern is not None and n > 0 and b > 0:
            a, c = outer if outer is not None else (np.zeros(n), np.zeros(b))
            kern.fold_rows(np.ascontiguousarray(scores), np.ascontiguousarray(a, np.float64),
                           np.ascontiguousarray(c, np.float64), s_sums, self.beta, int(offset),
                           float(self.log_never_kept), self.max_kept, start, self.run_max,
                           self.run_sum, self.run_t, self.run_s, self.top_scores,
                           self.top_index, self.fill, self.bar)
            if count:
                self.n_seen += b
                self.slice_sum_total += float(np.sum(s_sums))
            return
        step = max(1, _BLOCK_ELEMENTS // max(b, 1)) if xp is np else max(n, 1)
        step = min(step, max(n, 1))
        t_buf = xp.empty((step, b))
        e_buf = xp.empty((step, b))
        l_buf = xp.empty((step, b)) if outer is not None or scores.dtype != np.float64 else None
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            if l_buf is None:
                lk = scores[r0:r1]
            else:
                lk = l_buf[:r1 - r0]
                if outer is None:
                    lk[...] = scores[r0:r1]
                else:
                    xp.multiply(outer[0][r0:r1, None], outer[1][None, :], out=lk)
                    xp.subtract(scores[r0:r1], lk, out=lk)
            self._fold(lk, offset, s_sums, slice(start + r0, start + r1),
                       t_buf[:r1 - r0], e_buf[:r1 - r0])
        if count:
            self.n_seen += b
            self.slice_sum_total += float(xp.sum(s_sums))

    def _fold(self, scores: Any, offset: int, slice_sums: Any, rows: slice, t: Any,
              e: Any) -> None:
        """:meth:`update` for one block of rows (float64 ``scores``; ``t``, ``e`` buffers of
        the same shape)."""
        xp = get_array_module(scores)
        m_old = self.run_max[rows]
        m_new = xp.maximum(m_old, self.beta * xp.max(scores, axis=1))
        xp.multiply(scores, self.beta, out=t)
        t -= m_new[:, None]  # t_j = beta L_kj - max
        xp.exp(t, out=e)
        # rescale the old sums to the new maximum; exp(-inf - finite) = 0 on the first batch
        d = xp.where(xp.isfinite(m_old), m_old - m_new, 0.0)
        c = xp.exp(d)
        s_old = self.run_sum[rows]
        self.run_t[rows] = c * (self.run_t[rows] + d * s_old) + xp.einsum("ij,ij->i", e, t)
        self.run_sum[rows] = c * s_old + xp.sum(e, axis=1)
        self.run_s[rows] = c * self.run_s[rows] + e @ slice_sums
        self.run_max[rows] = m_new
        if self.top_scores.shape[1] == 1:  # the hard assignment: the exact tie rule
            top_s, top_i = _running_best(self.top_scores[rows], self.top_index[rows], scores,
                                         offset)
            self.top_scores[rows], self.top_index[rows] = top_s, top_i
        else:  # unordered buffers while streaming; finalize selects and sorts once
            floor = (None if not np.isfinite(self.log_never_kept)
                     else (m_new + self.log_never_kept) / self.beta)
            _fold_top_k(self.top_scores[rows], self.top_index[rows], self.fill[rows],
                        self.bar[rows], scores, offset, self.max_kept, floor)

    def finalize(self, posterior_mass: float, fluence: Any = None,
                 n_photons: Any = None) -> Posterior:
        """Sparsify: per image the smallest prefix of the top-k holding ``posterior_mass``.

        The kept weights are renormalised to sum to 1; ``dropped_mass`` is ``1 - kept``.
        If the top-k hold less than ``posterior_mass`` all ``k`` are kept. ``fluence`` is
        stored as given; with ``fluence=None`` it is ``N_k / expected_slice_sum`` (fitted
        scale scoring; needs ``n_photons``).
        """
        xp = get_array_module(self.top_scores)
        kern = compiled_kernels() if xp is np else None
        if self.top_scores.shape[1] > 1 and kern is not None:
            k = self.max_kept
            kern.thin_rows(self.top_scores, self.top_index, self.fill, k)
            w = max(int(self.fill.max()), k)
            kern.order_rows_desc(self.top_scores, self.top_index,
                                 np.argsort(self.top_scores[:, :w], axis=1), k)
            self.top_scores, self.top_index = self.top_scores[:, :k], self.top_index[:, :k]
        elif self.top_scores.shape[1] > 1:
            self.top_scores, self.top_index = _sort_desc(*_largest(
                self.top_scores, self.top_index, self.max_kept))
        log_z = self.run_max + xp.log(self.run_sum)
        exp_s = self.run_s / self.run_sum
        if fluence is None:
            fluence = update_fluence(n_photons, exp_s)
        if kern is not None:
            idx, weights, n_kept, total = kern.sparsify(
                self.top_scores, self.top_index, log_z, self.beta, float(posterior_mass))
            return self._posterior(idx, weights, n_kept, total, exp_s, fluence)
        p = xp.exp(self.beta * self.top_scores - log_z[:, None])  # -inf -> 0
        cum = xp.cumsum(p, axis=1)
        k = p.shape[1]
        # keep slot i while the mass before it is short of the target: the first slot always
        n_kept = xp.minimum(xp.sum(cum[:, :-1] < posterior_mass, axis=1) + 1, k)
        n_kept = xp.minimum(n_kept, xp.sum(xp.isfinite(self.top_scores), axis=1))
        keep = xp.arange(k)[None, :] < n_kept[:, None]
        kept = xp.where(keep, p, 0.0)
        total = xp.sum(kept, axis=1)
        return self._posterior(xp.where(keep, self.top_index, -1), kept / total[:, None],
                               n_kept.astype(np.int64), total, exp_s, fluence)

    def _posterior(self, indices: Any, weights: Any, n_kept: Any, total: Any, exp_s: Any,
                   fluence: Any) -> Posterior:
        """The :class:`Posterior` of :meth:`finalize` from its selection (sorted rows)."""
        xp = get_array_module(weights)
        return Posterior(
            indices=indices, weights=weights, n_kept=n_kept,
            log_likelihood=self.top_scores[:, 0].copy(),
            entropy=xp.log(self.run_sum) - self.run_t / self.run_sum,
            dropped_mass=xp.maximum(1.0 - total, 0.0), expected_slice_sum=exp_s,
            fluence=xp.asarray(fluence, dtype=np.float64), n_orientations=self.n_seen,
            mean_slice_sum=self.slice_sum_total / max(self.n_seen, 1), beta=self.beta)


def score_orientations(images: Any, slice_batches: Iterable[tuple[int, Any]], *, beta: float,
                       max_kept: int, posterior_mass: float, fluence: Any = None,
                       fit_scale: bool = False, floor_rel: float = DEFAULT_FLOOR_REL,
                       image_batch: int = 4096, background_per_fluence: Any = None,
                       n_orientations: int = 0) -> Posterior:
    """Orientation posterior of every local image over a stream of model-slice batches.

    Parameters
    ----------
    images : array (n, P) float32/float64
        Photon counts at the good pixels (:func:`photon_counts`).
    slice_batches : iterable of (offset, array (B, P))
        Model slices (expected photons, fluence 1) with the grid index of their first
        orientation (``Slicer.iter_batches``); every orientation exactly once.
    beta : float
        Inverse temperature (:func:`beta_schedule`).
    max_kept : int
        Cap ``k`` on the orientations kept per image (1 = hard assignment).
    posterior_mass : float
        Mass in (0, 1] the kept orientations must reach (:meth:`PosteriorState.finalize`).
    fluence : array (n,) float64
        ``phi_k`` (required unless ``fit_scale``): :func:`initial_fluence` in the first
        scoring generation, :func:`update_fluence` of the previous posterior afterwards.
    fit_scale : bool
        Fitted per-pair fluence score instead of the EMC fluence (module doc).
    background_per_fluence : array (P,) or None
        ``b / phi_ref`` (:func:`spinifel.orientation.background.background_per_fluence`),
        added to every slice before the log: the score of the model with background
        (derivation in :mod:`spinifel.orientation.background`). None = no background.
    n_orientations : int
        The number of orientations the batches hold in all (0 = unknown). When given,
        scores too improbable to be kept skip the top-k bookkeeping (same result, faster at
        large beta; :class:`PosteriorState`).

    Returns
    -------
    Posterior
        Memory ``O(n k)``, independent of the number of orientations; ``mean_slice`` is the
        orientation average of the slices as given (without the background).
    """
    xp = get_array_module(images)
    n = images.shape[0]
    if fluence is None and not fit_scale:
        raise ValueError("fluence is required unless fit_scale")
    n_photons = xp.sum(images, axis=1, dtype=np.float64)
    phi = None if fit_scale else xp.asarray(fluence, dtype=np.float64)
    state = PosteriorState.empty(n, max_kept, beta, xp, posterior_mass, n_orientations)
    slice_total = xp.zeros(images.shape[1])
    bg = None if background_per_fluence is None else xp.asarray(background_per_fluence)
    for offset, slices in slice_batches:
        w = xp.asarray(slices, dtype=images.dtype)
        if bg is not None:
            slice_total += xp.sum(w, axis=0, dtype=np.float64)
            log_w, sums = log_slices((w + bg[None, :]).astype(images.dtype), floor_rel)
        else:  # the orientation average's sums in the same pass as the clip
            log_w, sums = log_slices(w, floor_rel, slice_total)
        for a in range(0, n, image_batch):
            b = min(a + image_batch, n)
            # poisson_scores(images[a:b], ...), its fluence term applied block by block
            f, c = _fluence_term(sums, None if phi is None else phi[a:b], n_photons[a:b],
                                 fit_scale)
            state.update(images[a:b] @ log_w.T, offset, sums, slice(a, b), count=a == 0,
                         outer=(f, c))
    post = state.finalize(posterior_mass, phi, n_photons)
    post.mean_slice = slice_total / max(state.n_seen, 1)
    return post


def beta_schedule(generation: int, generations: int, beta_start: float, beta_end: float = 1.0,
                  ramp: int = 0) -> float:
    """Inverse temperature of the posterior at an M-TIP generation (geometric ramp).

    ``beta`` multiplies the log-likelihood: ``P ~ exp(beta L)``. Early models are poor, and
    at hundreds of photons per image ``L`` differs by hundreds between orientations, so
    ``beta = 1`` makes each image pick one orientation of a wrong model and lock in. A small
    ``beta`` spreads each image over the orientations the model cannot yet tell apart. It
    must not stay low too long: the posterior then averages a pseudo-symmetric state into
    the map and keeps it (Dragonfly over 10-20 iterations with a ramp meant for 100: 72% of
    frames at a 180 degree turn, docs/peers.md). So ``beta`` grows geometrically (a constant
    factor per generation, like EMC's "multiply every n iterations"), from ``beta_start`` at
    generation 1 (the first scored one; generation 0 merges random orientations) to
    ``beta_end`` at generation ``ramp`` and stays there. ``ramp = 0`` chooses
    ``round(0.75 * (generations - 1))``: ``beta`` reaches 1 three quarters into the run,
    what fixed Dragonfly's short runs.

    Returns
    -------
    float
        ``beta_start * (beta_end / beta_start) ** ((g - 1) / (ramp - 1))`` clamped to the ramp.
    """
    if ramp <= 0:
        ramp = max(1, round(0.75 * (generations - 1)))
    if generation >= ramp or ramp == 1:
        return float(beta_end)
    g = max(generation, 1)
    return float(beta_start * (beta_end / beta_start) ** ((g - 1) / (ramp - 1)))


def posterior_settings(algorithm: Any, generation: int) -> dict[str, Any]:
    """Keyword arguments of :func:`score_orientations` from the config at a generation.

    Parameters
    ----------
    algorithm : spinifel.config.AlgorithmConfig
        Reads ``generations``, ``orientations_per_image``, ``posterior_mass``,
        ``beta_start``, ``beta_end``, ``beta_ramp``, ``fluence`` and ``likelihood_floor``.
    generation : int
        M-TIP generation (1 = the first scored one).

    Returns
    -------
    dict
        ``beta``, ``max_kept``, ``posterior_mass``, ``fit_scale``, ``floor_rel`` (add
        ``fluence`` and ``image_batch``).
    """
    a = algorithm
    return {"beta": beta_schedule(generation, a.generations, a.beta_start, a.beta_end, a.beta_ramp),
            "max_kept": a.orientations_per_image, "posterior_mass": a.posterior_mass,
            "fit_scale": a.fluence == "fitted", "floor_rel": a.likelihood_floor}


def are_photon_counts(images: Any, integer_tol: float = 1e-3) -> bool:
    """Whether every value is within ``integer_tol`` of a non-negative integer (finite): the
    rule by which :func:`photon_counts` accepts data as counts without ``adu_per_photon``."""
    xp = get_array_module(images)
    if images.size == 0:
        return True
    if not bool(xp.all(xp.isfinite(images))):
        return False
    return (float(xp.min(images)) >= -integer_tol
            and float(xp.max(xp.abs(images - xp.rint(images)))) <= integer_tol)


def photon_counts(images: Any, adu_per_photon: float, source: str, dataset: str = "images",
                  integer_tol: float = 1e-3, noise_tol: float = 0.5) -> Any:
    """Images as photon counts for the Poisson score, or a DatasetError naming the data.

    Policy: with ``adu_per_photon > 0`` values are divided by it and rounded to the nearest
    integer; negative values down to ``-noise_tol`` photons (read-out noise around 0)
    become 0; anything more negative is refused. With ``adu_per_photon = 0`` the data must
    already be counts: every value within ``integer_tol`` of a non-negative integer
    (simulators and photon-counting detectors write exact integers), else refused.

    Parameters
    ----------
    images : array (n, P)
        Local images at the good pixels, any float dtype; the result keeps it.
    source, dataset : str
        File and dataset named in the error.

    Raises
    ------
    DatasetError
        One line: what was found and the keys that fix it.
    """
    xp = get_array_module(images)
    x = images / images.dtype.type(adu_per_photon) if adu_per_photon > 0 else images
    hint = "set data.adu_per_photon or algorithm.score = 'euclidean'"
    bad_finite = ~xp.isfinite(x)
    if bool(xp.any(bad_finite)):
        i = int(to_module(xp.argmax(xp.any(bad_finite, axis=1)), np))
        raise DatasetError(source, dataset, f"image {i} has non-finite values; the Poisson "
                           "score needs photon counts")
    r = xp.rint(x)
    low = float(xp.min(x)) if x.size else 0.0
    if adu_per_photon > 0:
        if low < -noise_tol:
            raise DatasetError(source, dataset, f"value {low:.3g} photons after dividing by "
                               f"data.adu_per_photon = {adu_per_photon}: below -{noise_tol}, not "
                               "read-out noise around 0; the Poisson score needs photon counts")
        return xp.maximum(r, 0).astype(images.dtype)
    dev = float(xp.max(xp.abs(x - r))) if x.size else 0.0
    if low < -integer_tol or dev > integer_tol:
        what = (f"negative value {low:.3g}" if low < -integer_tol
                else f"non-integer values (up to {dev:.3g} from the nearest integer)")
        raise DatasetError(source, dataset, f"{what}: not photon counts, which the Poisson "
                           f"score needs; {hint}")
    return xp.maximum(r, 0).astype(images.dtype)
