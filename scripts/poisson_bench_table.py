#!/usr/bin/env python3
"""Write the Poisson path's benchmark numbers into docs/performance.md from its JSON.

Usage::

    python scripts/poisson_bench_table.py docs/data/bench/poisson.json [--update docs/performance.md]

The JSON is written by ``spinifel-mpi bench --poisson-only ... --json FILE``. Text goes between
``<!-- results:poisson_bench -->`` and ``<!-- /results:poisson_bench -->``; every number comes
from the JSON (per rank: the likelihood cases against their bare GEMMs, and the probabilistic
merge's cost per active orientation and per kept pair). Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import update  # noqa: E402  (scripts/results.py: the marker-block writer)


def table(path: Path) -> str:
    d = json.loads(path.read_text())
    a, ranks = d["args"], d["ranks"]
    cmd = (f"mpiexec -n {len(ranks)} spinifel-mpi bench --poisson-only --images-per-rank "
           f"{a['images_per_rank']} --pixels {a['pixels']} --M {a['M']} --orientations "
           f"{a['orientations']}")
    load = ", ".join(f"{x:.1f}" for x in d.get("load_average", []))
    reps = next((v.get("repeats", 2) for k, v in ranks[0].items()
                 if k.startswith("likelihood")), 2)
    out = [f"`{cmd}` (commit {d.get('commit', '?')}; {a['photons']:g} photons per image; "
           f"BLAS {', '.join(d.get('blas', []))}; load average at the end {load} on 2 cores; "
           f"`{path.as_posix()}`). Per rank: ours = log-slices, GEMM, fluence term and "
           f"streaming posterior (best of {reps}); limit = the bare float32 GEMMs "
           f"`K @ log(W)^T` (best of {reps}); fraction = limit / ours. numpy passes = ours "
           "with the streaming posterior's numpy passes instead of the compiled ones (the path "
           f"cupy arrays take; best of {reps}, same run). The GEMM limit is timed again for "
           "each case and varies between cases (the ranks share the cores and their memory "
           "bandwidth); the conservative fraction divides the rank's fastest limit of the run "
           "by ours.", "",
           "| case | kept per image | beta | " + " | ".join(
               f"rank {r} s (limit s, fraction; conservative) | rank {r} numpy passes s"
               for r in range(len(ranks))) + " |",
           "|" + " --- |" * (3 + 2 * len(ranks))]
    fastest = [min(x["limit_seconds"] for k, x in r.items() if k.startswith("likelihood"))
               for r in ranks]
    for name, v in ranks[0].items():
        if not name.startswith("likelihood"):
            continue
        cells = []
        for r, lim in zip(ranks, fastest):
            x = r[name]
            cells.append(f"{x['seconds']:.2f} ({x['limit_seconds']:.2f}, "
                         f"{x['fraction_of_limit']:.2f}; {lim / x['seconds']:.2f})")
            cells.append(f"{x['numpy_passes_seconds']:.2f}" if "numpy_passes_seconds" in x
                         else "not measured")
        out.append(f"| `{name}` | {v['kept']} | {v['beta']:g} | " + " | ".join(cells) + " |")
    eps = ranks[0]["merge_nufft"].get("eps", 1e-6)
    out += ["", f"Probabilistic merge (both type-1 NUFFTs of every active orientation, eps {eps:g}, "
            "random posteriors with the given number kept per image), against the hard merge's "
            "NUFFTs of the same images:", "",
            "| kept per image | rank | active orientations | seconds | ms per active orientation "
            "| us per kept pair | x hard merge |", "|" + " --- |" * 7]
    for name in sorted((k for k in ranks[0] if k.startswith("probabilistic_merge")),
                       key=lambda k: ranks[0][k]["kept_per_image"]):
        for r, rk in enumerate(ranks):
            v = rk[name]
            out.append(f"| {v['kept_per_image']} | {r} | {v['active_orientations']} | "
                       f"{v['seconds']:.2f} | {1e3 * v['seconds_per_active_orientation']:.2f} | "
                       f"{1e6 * v['seconds_per_kept_pair']:.2f} | "
                       f"{v['ratio_to_hard_merge']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path)
    p.add_argument("--update", type=Path, nargs="*", default=[])
    args = p.parse_args(argv)
    text = table(args.json)
    for path in args.update:
        update(path, "poisson_bench", text)  # between <!-- results:NAME --> markers
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
