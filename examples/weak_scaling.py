"""Weak-scaling study: `spinifel-mpi bench` at 1..P ranks with the images per rank fixed.

What it does: runs the benchmark once per rank count, collects the per-stage seconds of
rank 0 and writes weak_scaling.json and weak_scaling.png (seconds per stage vs ranks and
the weak-scaling efficiency T(1)/T(P) of the whole generation).
Cost: about 20 s per rank count at the default sizes on this 2-core machine.
Launch (from the repository root, after `make venv`):
    .venv/bin/python examples/weak_scaling.py --max-ranks 2 --out weak_scaling
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STAGES = ("slicing", "matching", "merge_nufft", "merge_allreduce", "cg_iteration", "phasing_iteration")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-ranks", type=int, default=2)
    p.add_argument("--images-per-rank", type=int, default=500)
    p.add_argument("--pixels", type=int, default=32)
    p.add_argument("--M", type=int, default=41)
    p.add_argument("--orientations", type=int, default=2000)
    p.add_argument("--out", default="weak_scaling")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    rows = {}
    for n in range(1, args.max_ranks + 1):
        js = out / f"bench_{n}.json"
        cmd = [str(bindir / "mpiexec"), "-n", str(n), str(bindir / "spinifel-mpi"), "-q", "bench",
               "--images-per-rank", str(args.images_per_rank), "--pixels", str(args.pixels),
               "--M", str(args.M), "--orientations", str(args.orientations), "--json", str(js)]
        subprocess.run(cmd, check=True)
        rows[n] = json.loads(js.read_text())["ranks"][0]
    summary = {n: {s: rows[n][s]["seconds"] for s in STAGES} for n in rows}
    (out / "weak_scaling.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted(summary)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for s in STAGES:
        ax[0].plot(ranks, [summary[n][s] for n in ranks], "o-", label=s)
    ax[0].set_xlabel("ranks (images per rank fixed)")
    ax[0].set_ylabel("seconds")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=7)
    total = {n: sum(summary[n][s] for s in ("slicing", "matching", "merge_nufft", "merge_allreduce"))
             for n in ranks}
    ax[1].plot(ranks, [total[ranks[0]] / total[n] for n in ranks], "o-")
    ax[1].set_ylim(0, 1.1)
    ax[1].set_xlabel("ranks")
    ax[1].set_ylabel("weak-scaling efficiency (slicing+matching+merge)")
    fig.tight_layout()
    fig.savefig(out / "weak_scaling.png", dpi=100)
    for n in ranks:
        print(n, "ranks:", {s: round(summary[n][s], 4) for s in STAGES},
              "efficiency", round(total[ranks[0]] / total[n], 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
