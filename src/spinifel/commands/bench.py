"""Time every stage against the limit measured in the same run (per rank, synthetic data).

For each stage (slicing, matching, merge NUFFTs, Allreduce, CG iteration, phasing
iteration) prints our time, the time of the bare library operation on the same shapes
(finufft plan, BLAS GEMM, FFT pair) and their ratio, and the BLAS library that ran.

examples:
  spinifel-mpi bench                                    # small case, 1 rank
  mpiexec -n 2 spinifel-mpi bench --images-per-rank 2000 --pixels 128 --M 81 --orientations 10000 --json bench.json
"""

from __future__ import annotations

import argparse
import json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images-per-rank", type=int, default=500)
    parser.add_argument("--pixels", type=int, default=32, help="detector side in pixels")
    parser.add_argument("--M", type=int, default=41, help="grid size (odd)")
    parser.add_argument("--orientations", type=int, default=2000)
    parser.add_argument("--precision", choices=["single", "double"], default="single")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--coarse-orientations", type=int, default=0,
                        help="coarse grid of the coarse-to-fine search (0 = orientations / 8)")
    parser.add_argument("--coarse-resolution", type=float, default=0.7,
                        help="fraction of the largest |s| used in the coarse pass")
    parser.add_argument("--coarse-candidates", type=int, default=2,
                        help="coarse orientations kept per image")
    parser.add_argument("--coarse-radius", type=float, default=1.25,
                        help="fine neighbours within this many coarse grid spacings")
    parser.add_argument("--coarse-twins", action=argparse.BooleanOptionalAction, default=True,
                        help="also search around the half-turn twin of every coarse candidate")
    parser.add_argument("--polar-only", action="store_true",
                        help="only the polar search case (e.g. the paper's per-node setting: "
                             "--pixels 128 --M 81 --orientations 1200000 --images-per-rank 500)")
    parser.add_argument("--poisson-only", action="store_true",
                        help="only the Poisson path: the likelihood score against its GEMMs "
                             "(kept x beta cases) and the probabilistic merge (e.g. the "
                             "photon-limited shape: --pixels 64 --M 51 --orientations 5000 "
                             "--images-per-rank 2500)")
    parser.add_argument("--polar-n-psi", type=int, default=0,
                        help="in-plane angles of the polar search (0 = auto)")
    parser.add_argument("--polar-candidates", type=int, default=2,
                        help="orientations per image rescored exactly after the polar score")
    parser.add_argument("--polar-batch", type=int, default=0,
                        help="directions per batch (0 = the solver's: the model values of 500 "
                             "ordinary slices)")
    parser.add_argument("--agreement-directions", type=int, default=-1,
                        help="directions of the sub-grid on which polar and exhaustive search "
                             "are compared (-1 = all, 0 = no comparison)")
    parser.add_argument("--agreement-images", type=int, default=0,
                        help="images of that comparison (0 = images per rank)")
    parser.add_argument("--photons", type=float, default=None,
                        help="photons per image of the polar comparison's Poisson images "
                             "(default 1e4) or, with --poisson-only, of its count images "
                             "(default 1000)")
    parser.add_argument("--json", help="write the measurements (every rank's) to this file")
    parser.add_argument("--plot", help="write the per-stage breakdown (rank 0) to this PNG")
    parser.add_argument("--compare", action="store_true",
                        help="also time matching against faiss IndexFlatL2 and scikit-learn "
                             "brute-force nearest neighbours (when installed: .[compare])")


def main(args: argparse.Namespace) -> int:
    from spinifel.bench.runner import format_polar, format_table, plot_breakdown, run_bench
    from spinifel.config import load_config
    from spinifel.parallel.context import ParallelContext, collective
    from spinifel.runtime import configure_threads

    # validate the sizes with the config's own rules
    collective_ctx = ParallelContext.from_world()
    collective(collective_ctx.comm, load_config, None,
               [f"algorithm.M={args.M}", f"algorithm.n_orientations={args.orientations}",
                f"runtime.threads_per_rank={args.threads}",
                f"algorithm.coarse_n_orientations={args.coarse_orientations}",
                f"algorithm.coarse_resolution={args.coarse_resolution}",
                f"algorithm.coarse_candidates={args.coarse_candidates}",
                f"algorithm.coarse_radius={args.coarse_radius}",
                f"algorithm.coarse_twins={str(args.coarse_twins).lower()}"])
    threads = configure_threads(args.threads)
    comm = collective_ctx.comm
    if args.polar_only:
        return _polar_only(args, comm, collective_ctx, threads)
    if args.poisson_only:
        return _poisson_only(args, comm, collective_ctx, threads)
    res = run_bench(comm, images_per_rank=args.images_per_rank, n_pixels=args.pixels, M=args.M,
                    n_orientations=args.orientations, precision=args.precision,
                    threads=args.threads,
                    search={"coarse_n_orientations": args.coarse_orientations,
                            "coarse_resolution": args.coarse_resolution,
                            "coarse_candidates": args.coarse_candidates,
                            "coarse_radius": args.coarse_radius,
                            "coarse_twins": args.coarse_twins},
                    compare=args.compare, polar=_polar_settings(args))
    from spinifel.parallel.collectives import allgather_objects
    from spinifel.pipeline import peak_rss_mib

    res["peak_rss_mib"] = {"value": peak_rss_mib()}
    every = allgather_objects(comm, res)
    if collective_ctx.is_root:
        head = (f"spinifel-mpi bench: {comm.Get_size()} rank(s), {args.images_per_rank} images/rank of "
                f"{args.pixels}x{args.pixels}, M={args.M}, {args.orientations} orientations, "
                f"{args.precision}; BLAS: {', '.join(threads['blas'])}")
        print(format_table(every[0], head))
        print("peak RSS per rank (MiB): "
              + ", ".join(f"{r['peak_rss_mib']['value']:.0f}" for r in every)
              + " (the benchmark keeps every slice and every NUFFT point for its limit "
              "measurements; a run slices in batches)")
        fft = every[0]["fft_library"]
        print(f"FFT pair on the (2M)^3 grid: scipy.fft {fft['scipy_fft_pair']:.4f} s, "
              f"numpy.fft {fft['numpy_fft_pair']:.4f} s (the merge uses scipy.fft)")
        if args.compare:
            from spinifel.bench.compare import format_compare

            print(format_compare(every[0]["compare_matching"]))
        c2f = every[0]["coarse_to_fine"]
        print(f"coarse-to-fine search ({c2f['coarse_orientations']} coarse orientations on "
              f"{c2f['coarse_pixels']} of {c2f['fine_pixels']} pixels, "
              f"{c2f['settings']['coarse_candidates']} candidates"
              f"{' and their twins' if c2f['settings']['coarse_twins'] else ''}): {c2f['evaluations']:.4g} distance "
              f"evaluations vs {c2f['exhaustive_evaluations']:.4g} exhaustive "
              f"({c2f['evaluation_ratio']:.2f}x fewer), {c2f['seconds']:.3f} s vs "
              f"{c2f['exhaustive_seconds']:.3f} s (slicing included), same orientation for "
              f"{100 * c2f['agreement']:.1f}% of the images")
        print(format_polar(every[0]["polar_search"]))
        if args.plot:
            plot_breakdown(every[0], args.plot, head.split(";")[0])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args) | {"_module": None, "_needs_mpi": None},
                           "blas": threads["blas"], "ranks": every}, f, indent=2, default=str)
    return 0


def _polar_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`spinifel.bench.polar.polar_bench` from the options."""
    from spinifel.orientation.polar import polar_sizes

    n_dir, _ = polar_sizes(args.orientations, args.polar_n_psi)
    sub = n_dir if args.agreement_directions < 0 else args.agreement_directions
    return {"n_psi": args.polar_n_psi, "candidates": args.polar_candidates,
            "batch": args.polar_batch, "agreement_directions": sub,
            "agreement_images": args.agreement_images,
            "photons": 1e4 if args.photons is None else args.photons}


def _commit() -> str:
    """The commit of the code that runs (read before the run; "" outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _poisson_only(args: argparse.Namespace, comm, ctx, threads: dict) -> int:
    """``--poisson-only``: the likelihood and probabilistic-merge entries alone."""
    import os

    from spinifel.bench.runner import format_table, run_poisson_bench
    from spinifel.config import load_config
    from spinifel.parallel.collectives import allgather_objects

    commit = _commit()
    photons = 1000.0 if args.photons is None else args.photons
    merge_eps = load_config(None).algorithm.nufft_eps_merge  # the runs' default
    res = run_poisson_bench(comm, images_per_rank=args.images_per_rank, n_pixels=args.pixels,
                            M=args.M, n_orientations=args.orientations,
                            precision=args.precision, threads=args.threads, photons=photons,
                            merge_eps=merge_eps)
    every = allgather_objects(comm, res)
    if ctx.is_root:
        head = (f"spinifel-mpi bench --poisson-only: {comm.Get_size()} rank(s), "
                f"{args.images_per_rank} images/rank of {args.pixels}x{args.pixels}, "
                f"{photons:g} photons/image, M={args.M}, {args.orientations} orientations, "
                f"{args.precision}; BLAS: {', '.join(threads['blas'])}")
        print(format_table(every[0], head))
        for name, v in every[0].items():
            if name.startswith("probabilistic_merge"):
                print(f"{name}: {v['seconds_per_active_orientation'] * 1e3:.3f} ms per active "
                      f"orientation ({v['active_orientations']}), "
                      f"{v['seconds_per_kept_pair'] * 1e6:.2f} us per kept pair, "
                      f"{v['ratio_to_hard_merge']:.2f}x the hard merge's NUFFTs")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args) | {"_module": None, "_needs_mpi": None,
                                                 "photons": photons},
                           "blas": threads["blas"], "commit": commit,
                           "load_average": os.getloadavg(), "ranks": every}, f, indent=2,
                          default=str)
    return 0


def _polar_only(args: argparse.Namespace, comm, ctx, threads: dict) -> int:
    """``--polar-only``: the polar search case alone; JSON like the full bench's."""
    import os

    from spinifel.bench.runner import format_polar, run_polar_bench
    from spinifel.parallel.collectives import allgather_objects

    commit = _commit()
    res = run_polar_bench(comm, images_per_rank=args.images_per_rank, n_pixels=args.pixels,
                          M=args.M, n_orientations=args.orientations, precision=args.precision,
                          threads=args.threads, polar=_polar_settings(args))
    every = allgather_objects(comm, res)
    if ctx.is_root:
        print(f"spinifel-mpi bench --polar-only: {comm.Get_size()} rank(s), "
              f"{args.images_per_rank} images/rank of {args.pixels}x{args.pixels}, M={args.M}")
        for r, v in enumerate(every):
            print(f"rank {r}: " + format_polar(v["polar_search"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args) | {"_module": None, "_needs_mpi": None},
                           "blas": threads["blas"], "commit": commit,
                           "load_average": os.getloadavg(), "ranks": every}, f, indent=2,
                          default=str)
    return 0
