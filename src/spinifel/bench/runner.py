"""Per-stage benchmark with the limit of each stage measured in the same run.

For every stage the time of our implementation is put next to the time of the bare
library operation it is built on, on the same shapes and points:

==========  =========================================  ==========================================
stage       ours                                       limit measured in the same run
==========  =========================================  ==========================================
slicing     ``Slicer`` over the orientation grid       one finufft type-2 plan, all points at once
matching    ``match_orientations`` (slices given)      the bare float GEMMs of the same shapes
c2f search  ``match_coarse_to_fine`` (slicing incl.)   exhaustive slicing + matching (same grid)
merge NUFFT ``accumulate_normal_equations``            bare type-1 plans onto M^3 and (2M)^3
likelihood  ``score_orientations`` (slices given)      the bare float GEMMs ``K @ log(W)^T``
prob. merge posterior merge, 1/8/64 kept per image     (ratio to the hard merge; module
                                                       :mod:`spinifel.bench.poisson`)
CG          time per iteration of the sweep            one rfftn + irfftn pair on (2M)^3
phasing     time per ER/HIO iteration                  one rfftn + irfftn pair on M^3
==========  =========================================  ==========================================

``fraction`` = limit time / our time (1.0 = at the limit). Data are synthetic model
slices of a random compact density at random orientations (the timings do not depend on
the content except through CG iteration counts).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.fft

from spinifel.backend.nufft import Type1, Type2
from spinifel.geometry.orientations import orientation_grid, random_quaternions
from spinifel.geometry.points import rotated_points
from spinifel.merging.merge import accumulate_normal_equations, ball_support, merge
from spinifel.orientation.matching import match_orientations
from spinifel.orientation.slicing import Slicer
from spinifel.parallel.collectives import barrier
from spinifel.phasing.algorithms import autocorrelation_from_density


def _clock(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _fft_pair(n: int, workers: int, dtype=np.float64) -> float:
    x = np.random.default_rng(0).standard_normal((n, n, n)).astype(dtype)

    def pair():
        scipy.fft.irfftn(scipy.fft.rfftn(x, workers=workers), s=x.shape, workers=workers)

    pair()
    return _clock(pair, 3)


def synthetic_model(M: int, n_pixels: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """A random compact density's autocorrelation ``(M, M, M)``, the reciprocal positions
    ``(3, n_pixels^2)`` of a flat 6 keV detector and their largest ``|s|`` (draws from ``rng``)."""
    from spinifel.geometry.detector import flat_detector_positions, photon_energy_to_wavelength

    idx = np.indices((M, M, M)) - (M - 1) / 2
    rho = np.zeros((M, M, M))
    for c in rng.uniform(-M / 8, M / 8, (12, 3)):
        rho += np.exp(-((idx - c[:, None, None, None]) ** 2).sum(0) / 2.0)
    ac = autocorrelation_from_density(rho)
    pos = flat_detector_positions(n_pixels, 1.5e-3 * 64 / n_pixels, 0.2,
                                  photon_energy_to_wavelength(6000.0)).reshape(-1, 3).T
    return ac, pos, float(np.linalg.norm(pos, axis=0).max())


def synthetic_problem(M: int, n_pixels: int, n_images: int, seed: int, dtype) -> dict:
    """A random compact density's autocorrelation, a flat detector and exact model images."""
    rng = np.random.default_rng(seed)
    ac, pos, extent = synthetic_model(M, n_pixels, rng)
    q = random_quaternions(n_images, rng)
    images = Slicer(ac, pos, extent, 1e-6, dtype).slices(q)
    return {"ac": ac, "positions": pos, "extent": extent, "quaternions": q, "images": images}


def search_bench(images: np.ndarray, slicer: Slicer, ac: np.ndarray, positions: np.ndarray,
                 extent: float, grid: np.ndarray, batch: int, dtype, threads: int,
                 exhaustive_seconds: float, exhaustive_batches, coarse_n_orientations: int = 0,
                 coarse_resolution: float = 0.7, coarse_candidates: int = 2,
                 coarse_radius: float = 1.25, coarse_twins: bool = True) -> dict:
    """Coarse-to-fine search against exhaustive matching on the same images and fine grid.

    Returns its seconds (slicing included), ``exhaustive_seconds`` (given: slicing +
    matching of the whole grid), the distance evaluations of both, their ratio, and the
    fraction of images that get the same fine orientation.
    """
    from spinifel.geometry.orientations import grid_spacing
    from spinifel.orientation.coarse_to_fine import (
        coarse_pixel_selection,
        default_coarse_size,
        match_coarse_to_fine,
        search_lists,
        twin_axis,
    )

    kc = coarse_n_orientations or default_coarse_size(len(grid))
    coarse = orientation_grid(kc)
    t = time.perf_counter()
    indptr, indices = search_lists(coarse, grid, coarse_radius * grid_spacing(kc),
                                   twin_axis(positions) if coarse_twins else None)
    t_nbr = time.perf_counter() - t
    exh = match_orientations(images, exhaustive_batches, True, 4096, "sqrt")
    cpix = coarse_pixel_selection(positions, coarse_resolution)
    cslicer = Slicer(ac, positions[:, cpix], extent, 1e-4, dtype, threads)
    res: list = []
    t_ours = _clock(lambda: res.__setitem__(slice(None), match_coarse_to_fine(
        images, slicer, cslicer, cpix, grid, coarse, indptr, indices, coarse_candidates, batch,
        True, 4096, "sqrt", coarse_twins)))
    st, stats = res
    return {"seconds": t_ours, "limit_seconds": None, "exhaustive_seconds": exhaustive_seconds,
            "evaluations": stats.evaluations, "exhaustive_evaluations": stats.exhaustive_evaluations,
            "evaluation_ratio": stats.reduction,
            "agreement": float(np.mean(st.best_index == exh.best_index)),
            "coarse_orientations": kc, "coarse_pixels": stats.coarse_pixels,
            "fine_pixels": stats.fine_pixels, "fine_sliced": stats.fine_sliced,
            "neighbour_lists_seconds": t_nbr, "stages": dict(stats.timings),
            "settings": {"coarse_resolution": coarse_resolution,
                         "coarse_candidates": coarse_candidates, "coarse_radius": coarse_radius,
                         "coarse_twins": coarse_twins}}


def _phasing_bench(ac: np.ndarray, M: int, threads: int, fft_pair_2m: float) -> dict:
    """Phasing per iteration against one FFT pair on M^3, and scipy.fft vs numpy.fft on the
    merge's (2M)^3 grid (``fft_pair_2m``: the scipy pair, measured for the CG)."""
    out: dict = {}
    dtype = ac.dtype
    # phasing: time per iteration vs one FFT pair on M^3, with the pipeline's loop shape
    # (50 ER, 25 HIO, 50 ER, shrinkwrap, then 50 final ER) and a measured-shell Fourier mask
    from spinifel.phasing.phase import phase

    k = np.arange(M) - (M - 1) / 2
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    fmask = (r >= 1.5) & (r <= (M - 1) / 2)
    n_it = 50 + 25 + 50 + 50
    t_ph = _clock(lambda: phase(ac, n_loops=1, n_er=50, n_hio=25,
                                beta=0.3, sw_sigma=1.0, sw_threshold=0.1, n_final_er=50,
                                rng=np.random.default_rng(0), fourier_mask=fmask))
    out["phasing_iteration"] = {"seconds": t_ph / n_it,
                                "limit_seconds": _fft_pair(M, threads, dtype)}
    # FFT library choice for the merge's (2M)^3 real transforms: scipy.fft vs numpy.fft
    x = np.random.default_rng(1).standard_normal((2 * M,) * 3)
    t_np = _clock(lambda: np.fft.irfftn(np.fft.rfftn(x), s=x.shape, axes=(0, 1, 2)), 3)
    out["fft_library"] = {"scipy_fft_pair": fft_pair_2m,
                          "numpy_fft_pair": t_np}
    return out


def merge_eps_bench(comm: Any, images: np.ndarray, quats: np.ndarray, pos: np.ndarray,
                    extent: float, M: int, threads: int, eps_values=(1e-6, 1e-4),
                    repeat: int = 3) -> dict:
    """The merge's NUFFT seconds at several ``nufft_eps_merge`` (collective): the best of
    ``repeat`` interleaved runs each, and the ratio of the first eps's time to each other's."""
    best = {e: float("inf") for e in eps_values}
    for _ in range(repeat):
        for e in eps_values:
            t: dict = {}
            accumulate_normal_equations(comm, images, quats, pos, extent, M, None, e, threads,
                                        1024, t)
            best[e] = min(best[e], t["merge_nufft"])
    ref = best[eps_values[0]]
    return {"seconds": best[eps_values[-1]], "limit_seconds": None,
            "eps": [float(e) for e in eps_values], "eps_seconds": [best[e] for e in eps_values],
            "speedup_vs_first": [ref / best[e] for e in eps_values]}


def run_bench(comm: Any, *, images_per_rank: int, n_pixels: int, M: int, n_orientations: int,
              precision: str = "single", threads: int = 1, orientation_batch: int = 500,
              seed: int = 0, search: dict | None = None, compare: bool = False, polar=None):
    """Time every stage and its limit on this rank's synthetic data (collective over ``comm``).

    ``search``, ``polar``: keyword arguments of :func:`search_bench` (coarse-to-fine) and
    :func:`spinifel.bench.polar.polar_bench`.
    ``compare``: also time matching against faiss and scikit-learn on the same images and
    slices (:func:`spinifel.bench.compare.compare_matching`), under ``compare_matching``.
    """
    dtype = np.float32 if precision == "single" else np.float64
    rank = comm.Get_rank()
    prob = synthetic_problem(M, n_pixels, images_per_rank, seed + rank, dtype)
    ac, pos, extent = prob["ac"], prob["positions"], prob["extent"]
    images, quats = prob["images"], prob["quaternions"]
    grid = orientation_grid(n_orientations)
    P = pos.shape[1]
    out: dict[str, dict] = {}

    # slicing
    slicer = Slicer(ac, pos, extent, 1e-4, dtype, threads)
    batches: list = []
    t_ours = _clock(lambda: batches.__setitem__(slice(None), list(slicer.iter_batches(grid, orientation_batch))))
    raw = Type2((M, M, M), 1e-4, dtype, threads)
    pts = rotated_points(grid, pos, extent, dtype)
    modes = ac.astype(raw.complex_dtype)

    def raw_slice():
        raw.setpts(pts)
        raw.execute(modes)

    t_lim = _clock(raw_slice)
    n_pts = len(grid) * P
    out["slicing"] = {"seconds": t_ours, "limit_seconds": t_lim, "rate": n_pts / t_ours,
                      "unit": "points/s"}

    # matching (slices already computed)
    t_ours = _clock(lambda: match_orientations(images, iter(batches), True, 4096, "sqrt"))
    sq = [(o, np.sqrt(np.maximum(b, 0))) for o, b in batches]
    img_s = np.sqrt(np.maximum(images, 0))
    t_lim = _clock(lambda: [img_s @ b.T for _, b in sq])
    flops = 2.0 * len(images) * len(grid) * P
    out["matching"] = {"seconds": t_ours, "limit_seconds": t_lim, "rate": flops / t_ours / 1e9,
                       "unit": "GFLOP/s", "limit_rate": flops / t_lim / 1e9}
    if compare:
        from spinifel.bench.compare import compare_matching

        out["compare_matching"] = compare_matching(
            images, np.concatenate([b for _, b in batches]), threads, orientation_batch)

    # ring-distributed matching (slicing 1/R of the grid + the ring) vs replicated
    from spinifel.orientation.matching import match_distributed

    barrier(comm)
    t_dist = _clock(lambda: match_distributed(comm, images, slicer, grid, orientation_batch, True,
                                              4096, "sqrt"))
    out["matching_distributed"] = {
        "seconds": t_dist, "limit_seconds": None,
        "replicated_seconds": out["slicing"]["seconds"] + out["matching"]["seconds"]}

    # coarse-to-fine search vs exhaustive matching on the fine grid (both slice their own
    # model images here, so both times include slicing)
    out["coarse_to_fine"] = search_bench(images, slicer, ac, pos, extent, grid, orientation_batch,
                                         dtype, threads, out["slicing"]["seconds"]
                                         + out["matching"]["seconds"], iter(batches), **(search or {}))

    out["polar_search"] = _polar_case(comm, prob, n_orientations, dtype, threads, seed, polar)

    # merge NUFFTs (type 1 onto M^3 and (2M)^3)
    timings: dict = {}
    eq = [None]
    t_ours = _clock(lambda: eq.__setitem__(0, accumulate_normal_equations(
        comm, images, quats, pos, extent, M, None, 1e-6, threads, 1024, timings)))
    mpts = rotated_points(quats, pos, extent, np.float64)
    vals = np.asarray(images, dtype=np.float64).ravel()

    def raw_type1():
        for n in (M, 2 * M):
            p = Type1((n, n, n), 1e-6, np.float64, threads)
            p.setpts(mpts)
            p.execute(vals)

    t_lim = _clock(raw_type1)
    out["merge_nufft"] = {"seconds": timings["merge_nufft"], "limit_seconds": t_lim,
                          "rate": 2 * mpts.shape[1] / timings["merge_nufft"], "unit": "points/s"}
    out["merge_allreduce"] = {"seconds": timings["merge_allreduce"], "limit_seconds": None,
                              "bytes": 8 * ((2 * M) ** 3 + M ** 3 + 2)}

    out["merge_eps"] = merge_eps_bench(comm, images, quats, pos, extent, M, threads)

    # the Poisson path: likelihood score vs its GEMMs; probabilistic merge vs the hard one
    from spinifel.bench.poisson import likelihood_cases, merge_bench, photon_images

    counts = photon_images(images, 1000.0, seed + rank)
    out.update(likelihood_cases(counts, batches))
    out.update(merge_bench(comm, counts, grid, pos, extent, M, threads,
                           out["merge_nufft"]["seconds"], seed=seed + rank))

    # CG: time per iteration vs one FFT pair on (2M)^3
    z = np.zeros((M, M, M))
    mt: dict = {}
    res = merge(comm, eq[0], lambdas_rel=[1e-2], x0=z, x_init=z, support=ball_support(M),
                max_iter=30, tol=1e-12, nthreads=threads, timings=mt)
    its = max(res.cg_iterations[0], 1)
    per_it = mt["merge_cg"] / (its + 1)  # + the residual evaluation after CG
    out["cg_iteration"] = {"seconds": per_it, "limit_seconds": _fft_pair(2 * M, threads),
                           "iterations": its}

    out.update(_phasing_bench(res.autocorrelation.astype(dtype), M, threads,
                              out["cg_iteration"]["limit_seconds"]))
    for v in out.values():
        if v.get("limit_seconds"):
            v["fraction_of_limit"] = v["limit_seconds"] / v["seconds"]
    return out


def plot_breakdown(results: dict, path: str, title: str) -> None:
    """Bar chart: our seconds and the measured limit for every stage (log scale), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, v in results.items() if v.get("limit_seconds")]
    ours = [results[k]["seconds"] for k in names]
    lim = [results[k]["limit_seconds"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, ours, 0.4, label="spinifel-mpi")
    ax.bar(xs + 0.2, lim, 0.4, label="bare library operation (same shapes)")
    for x, v in zip(xs, names):
        ax.text(x, max(results[v]["seconds"], results[v]["limit_seconds"]) * 1.1,
                f"{results[v]['fraction_of_limit']:.2f}", ha="center", fontsize=8)
    ax.set_xticks(xs, names, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict, header: str) -> str:
    width = max([18] + [len(k) + 2 for k, v in results.items() if "seconds" in v])
    lines = [header, f"{'stage':<{width}}{'seconds':>10}{'limit s':>10}{'fraction':>10}  rate"]
    for name, v in results.items():
        if "seconds" not in v:
            continue
        lim = v.get("limit_seconds")
        frac = v.get("fraction_of_limit")
        rate = f"{v['rate']:.3g} {v['unit']}" if "rate" in v else ""
        if "limit_rate" in v:
            rate += f" (limit {v['limit_rate']:.3g})"
        lines.append(f"{name:<{width}}{v['seconds']:>10.4f}{(lim if lim else float('nan')):>10.4f}"
                     f"{(frac if frac else float('nan')):>10.2f}  {rate}")
    return "\n".join(lines)


def _polar_case(comm: Any, prob: dict, n_orientations: int, dtype, threads: int, seed: int,
                polar: dict | None) -> dict:
    """The polar search (directions x in-plane angles by FFT) against its limit and against
    exhaustive search on the same factorised grid (:func:`spinifel.bench.polar.polar_bench`)."""
    from spinifel.bench.polar import polar_bench

    return polar_bench(comm, images=prob["images"], ac=prob["ac"], pos=prob["positions"],
                       extent=prob["extent"], n_orientations=n_orientations, dtype=dtype,
                       threads=threads, seed=seed, **(polar or {}))


def run_polar_bench(comm: Any, *, images_per_rank: int, n_pixels: int, M: int,
                    n_orientations: int, precision: str = "single", threads: int = 1,
                    seed: int = 0, polar: dict | None = None) -> dict:
    """Only the polar search case (:func:`spinifel.bench.polar.polar_bench`) on this rank's
    synthetic data, e.g. the paper's per-node setting (collective)."""
    dtype = np.float32 if precision == "single" else np.float64
    prob = synthetic_problem(M, n_pixels, images_per_rank, seed + comm.Get_rank(), dtype)
    return {"polar_search": _polar_case(comm, prob, n_orientations, dtype, threads, seed, polar)}


def run_poisson_bench(comm: Any, *, images_per_rank: int, n_pixels: int, M: int,
                      n_orientations: int, precision: str = "single", threads: int = 1,
                      photons: float = 1000.0, orientation_batch: int = 500,
                      seed: int = 0, merge_eps: float = 1e-4) -> dict:
    """Only the Poisson path on this rank's synthetic data (collective): the likelihood score
    at each case of :data:`spinifel.bench.poisson.LIKELIHOOD_CASES` against its GEMMs, and the
    probabilistic merge at 1, 8 and 64 kept per image against the hard merge's NUFFTs (both
    at ``merge_eps``, the default ``algorithm.nufft_eps_merge``)."""
    from spinifel.bench.poisson import likelihood_cases, merge_bench, photon_images

    dtype = np.float32 if precision == "single" else np.float64
    rank = comm.Get_rank()
    prob = synthetic_problem(M, n_pixels, images_per_rank, seed + rank, dtype)
    pos, extent = prob["positions"], prob["extent"]
    grid = orientation_grid(n_orientations)
    slicer = Slicer(prob["ac"], pos, extent, 1e-4, dtype, threads)
    batches = list(slicer.iter_batches(grid, orientation_batch))
    counts = photon_images(prob["images"], photons, seed + rank)
    out: dict[str, dict] = likelihood_cases(counts, batches)
    timings: dict = {}
    accumulate_normal_equations(comm, counts, prob["quaternions"], pos, extent, M, None,
                                merge_eps, threads, 1024, timings)
    out["merge_nufft"] = {"seconds": timings["merge_nufft"], "limit_seconds": None,
                          "eps": merge_eps}
    out.update(merge_bench(comm, counts, grid, pos, extent, M, threads,
                           timings["merge_nufft"], seed=seed + rank, eps=merge_eps))
    for v in out.values():
        if v.get("limit_seconds"):
            v["fraction_of_limit"] = v["limit_seconds"] / v["seconds"]
    return out


def format_polar(r: dict) -> str:
    """One paragraph on the polar search case of one rank."""
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["parts"].items())
    lim = ", ".join(f"{k} {v:.2f} s" for k, v in r["limit_parts"].items())
    text = (f"polar search: {r['directions']} directions x {r['n_psi']} in-plane angles = "
            f"{r['orientations']} orientations, {r['polar_points']} polar points per direction "
            f"({r['pixels']} pixels), {r['images_all_ranks']} images on all ranks: "
            f"{r['seconds']:.2f} s wall ({parts}), {r['cpu_seconds']:.2f} s CPU; limit "
            f"{r['limit_seconds']:.2f} s CPU ({lim}), fraction {r['fraction_of_limit']:.2f}")
    if "agreement" in r:
        g = r["agreement"]
        text += (f"\n  agreement with exhaustive search on {g['sub_orientations']} orientations "
                 f"({g['sub_directions']} directions), {g['images']} images of "
                 f"{g['photons_per_image']:.3g} photons: {100 * g['within_one_step']:.1f}% within "
                 f"one grid step ({g['grid_step_deg']:.2f} deg), {100 * g['same_orientation']:.1f}% "
                 f"the same; {g['polar_seconds']:.2f} s vs {g['exhaustive_seconds']:.2f} s")
    return text
