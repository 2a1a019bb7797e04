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
    parser.add_argument("--json", help="write the measurements (every rank's) to this file")
    parser.add_argument("--plot", help="write the per-stage breakdown (rank 0) to this PNG")
    parser.add_argument("--compare", action="store_true",
                        help="also time matching against faiss IndexFlatL2 and scikit-learn "
                             "brute-force nearest neighbours (when installed: .[compare])")


def main(args: argparse.Namespace) -> int:
    from spinifel.bench.runner import format_table, plot_breakdown, run_bench
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
    res = run_bench(comm, images_per_rank=args.images_per_rank, n_pixels=args.pixels, M=args.M,
                    n_orientations=args.orientations, precision=args.precision,
                    threads=args.threads,
                    search={"coarse_n_orientations": args.coarse_orientations,
                            "coarse_resolution": args.coarse_resolution,
                            "coarse_candidates": args.coarse_candidates,
                            "coarse_radius": args.coarse_radius,
                            "coarse_twins": args.coarse_twins},
                    compare=args.compare)
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
        if args.plot:
            plot_breakdown(every[0], args.plot, head.split(";")[0])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args) | {"_module": None, "_needs_mpi": None},
                           "blas": threads["blas"], "ranks": every}, f, indent=2, default=str)
    return 0
