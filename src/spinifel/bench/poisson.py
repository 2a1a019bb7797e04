"""Benchmarks of the Poisson path: the likelihood score and the probabilistic merge.

==========================  ========================================  ==========================
stage                       ours                                      limit measured in the run
==========================  ========================================  ==========================
likelihood                  ``score_orientations`` (slices given):    the bare float GEMMs
                            log-slices, GEMM, streaming posterior     ``K @ log(W)^T`` alone
probabilistic_merge_kK      ``accumulate_posterior_normal_equations`` the hard merge of the
                            with K orientations kept per image        same images (its NUFFTs)
==========================  ========================================  ==========================

The merge entries report the seconds per kept (image, orientation) pair and per active
orientation (an orientation some local image keeps): the aggregated merge runs its NUFFTs
once per active orientation, so its cost follows the active orientations, not the pairs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from spinifel.merging.probabilistic import accumulate_posterior_normal_equations
from spinifel.orientation import likelihood
from spinifel.orientation.likelihood import Posterior, log_slices, score_orientations


def _clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def photon_images(images: np.ndarray, photons: float, seed: int) -> np.ndarray:
    """Poisson counts with ``photons`` expected per image from model images (same dtype)."""
    w = np.maximum(np.asarray(images, dtype=np.float64), 0)
    w *= photons / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    return np.random.default_rng(seed).poisson(w).astype(images.dtype)


# (kept, beta) of the likelihood entries: the bench's historical case (64 kept at beta 1, the
# entry "likelihood"), the hard assignment, and the photon-limited example's 512 kept at the
# end (beta 1) and at the start (beta 1e-3) of the annealing, where every score can enter
# the top-k race.
LIKELIHOOD_CASES = ((64, 1.0), (1, 1.0), (512, 1.0), (512, 1e-3))

# Timings of each likelihood entry: the best of this many (the two ranks share the cores
# and their memory bandwidth; on this 2-core machine single timings varied by 10%).
REPEATS = 3


def likelihood_bench(counts: np.ndarray, batches: list, kept: int = 64,
                     beta: float = 1.0) -> dict:
    """The Poisson score over given slice batches against its bare GEMMs (same shapes).

    Parameters
    ----------
    counts : ndarray (n, P) float32/float64
        Photon counts of this rank's images.
    batches : list of (offset, ndarray (B, P))
        Model slices of the whole grid (as matching gets them).
    kept : int
        ``orientations_per_image`` of the streaming posterior.
    beta : float
        Inverse temperature (small: broad posteriors, every score in the top-k race).

    Returns
    -------
    dict
        ``seconds`` (ours: log-slices, GEMM, fluence term and streaming posterior, the best
        of ``REPEATS`` after a first call that compiles), ``limit_seconds`` (the GEMMs
        ``K @ log(W)^T`` alone, the best of ``REPEATS``), rates in GFLOP/s of the GEMM's
        flops, ``kept``, ``beta``, ``compiled_passes`` (whether ``seconds`` used the numba
        passes), ``numpy_passes_seconds`` (the same with the numpy passes) and ``repeats``.
    """
    n_orient = sum(b.shape[0] for _, b in batches)

    def ours():
        score_orientations(counts, iter(batches), beta=beta, max_kept=kept,
                           posterior_mass=0.999, fit_scale=True, n_orientations=n_orient)

    logs = [log_slices(b.astype(counts.dtype))[0] for _, b in batches]
    compiled = likelihood.compiled_kernels() is not None
    ours()  # compiles the numba passes on first use (cached on disk afterwards)
    t_ours = min(_clock(ours) for _ in range(REPEATS))
    t_lim = min(_clock(lambda: [counts @ lw.T for lw in logs]) for _ in range(REPEATS))
    saved = likelihood.USE_COMPILED
    try:  # the same score with the numpy passes (the path cupy arrays take)
        likelihood.USE_COMPILED = False
        t_np = min(_clock(ours) for _ in range(REPEATS))
    finally:
        likelihood.USE_COMPILED = saved
    flops = 2.0 * counts.shape[0] * n_orient * counts.shape[1]
    return {"seconds": t_ours, "limit_seconds": t_lim, "rate": flops / t_ours / 1e9,
            "unit": "GFLOP/s", "limit_rate": flops / t_lim / 1e9, "kept": kept, "beta": beta,
            "compiled_passes": compiled, "numpy_passes_seconds": t_np, "repeats": REPEATS}


def likelihood_cases(counts: np.ndarray, batches: list,
                     cases: tuple = LIKELIHOOD_CASES) -> dict:
    """:func:`likelihood_bench` for each ``(kept, beta)``: entry ``likelihood`` for the
    first, ``likelihood_k{kept}_beta{beta:g}`` for the others."""
    out = {}
    for i, (kept, beta) in enumerate(cases):
        name = "likelihood" if i == 0 else f"likelihood_k{kept}_beta{beta:g}"
        out[name] = likelihood_bench(counts, batches, kept, beta)
    return out


def random_posterior(n: int, n_grid: int, kept: int, rng: np.random.Generator) -> Posterior:
    """``kept`` distinct random grid orientations per image with Dirichlet weights, fluence 1."""
    idx = np.argsort(rng.random((n, n_grid)), axis=1)[:, :kept].astype(np.int64)
    w = rng.dirichlet(np.ones(kept), size=n)
    z = np.zeros(n)
    return Posterior(indices=idx, weights=w, n_kept=np.full(n, kept, np.int64),
                     log_likelihood=z, entropy=z, dropped_mass=z, expected_slice_sum=z + 1,
                     fluence=z + 1, n_orientations=n_grid, mean_slice_sum=1.0, beta=1.0)


def merge_bench(comm: Any, counts: np.ndarray, grid: np.ndarray, positions: np.ndarray,
                extent: float, M: int, threads: int, hard_seconds: float,
                kept_values: tuple[int, ...] = (1, 8, 64), seed: int = 0,
                eps: float = 1e-6) -> dict:
    """The probabilistic merge at several numbers kept per image (collective over ``comm``).

    ``hard_seconds`` is the hard merge's NUFFT time of the same images at the same ``eps``
    (the reference).
    Returns one entry per value of ``kept``: ``probabilistic_merge_k{kept}``.
    """
    out = {}
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    for k in kept_values:
        post = random_posterior(n, len(grid), min(k, len(grid)), rng)
        active = len(np.unique(post.indices))
        timings: dict = {}
        accumulate_posterior_normal_equations(comm, counts, post, grid, positions, extent, M,
                                              None, eps, threads, 1024, timings)
        sec = timings["merge_nufft"]
        out[f"probabilistic_merge_k{k}"] = {
            "seconds": sec, "limit_seconds": None, "hard_merge_seconds": hard_seconds,
            "ratio_to_hard_merge": sec / hard_seconds, "kept_per_image": int(k),
            "kept_pairs": int(n * k), "active_orientations": active,
            "seconds_per_kept_pair": sec / (n * k), "seconds_per_active_orientation": sec / active,
            "eps": eps}
    return out
