#!/usr/bin/env python3
"""Measure the peak memory of runs against the memory estimate, and tabulate the results.

Usage::

    python scripts/memory_table.py measure docs/data/memory --ranks 2 \\
        --case 31:2000 --case 51:2000 --case 51:8000 --case 81:2000 --case 101:2000
    python scripts/memory_table.py reestimate docs/data/memory --work WORK
    python scripts/memory_table.py table docs/data/memory --update docs/scaling.md

``measure`` simulates the demo's geometry (the built-in molecule, 32 x 32 pixels of 3 mm,
noise-free) once per image count, then for each ``M:N_IMAGES`` case runs
``mpiexec -n RANKS spinifel-mpi run`` for two generations (generation 1 matches, refines and
merges: every stage's buffers are allocated) with few iterations (the iteration counts do not
change what is allocated) and no evaluation against the truth (real data have none). The run
itself writes its memory estimate and every rank's peak resident set size (``ru_maxrss``) into
``metrics.json`` ("memory"); this script copies that entry, with the case, the command and
the commit, to ``FOLDER/M<M>_n<N>_r<RANKS>.json``. ``reestimate`` adds the estimate of the
current code for each case (``run --dry-run`` with the case's settings on its dataset in
``WORK``, which ``measure`` left there) as ``estimate_now``, so a corrected estimate is
compared with the same measured peaks. ``table`` prints (or writes between the
``<!-- results:memory -->`` markers) the table of those JSONs. Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The demo's detector (spinifel.commands.demo.DEMO_SIM) and search grid.
SIM = ["--builtin", "--pixels", "32", "--pixel-size", "3e-3", "--M", "31", "--no-plot"]


def sim_args(pixels: int) -> list[str]:
    """The demo's detector with ``pixels`` per side over the same area (same |s| range)."""
    if pixels == 32:
        return list(SIM)
    return ["--builtin", "--pixels", str(pixels), "--pixel-size", f"{3e-3 * 32 / pixels:.6g}",
            "--M", "31", "--no-plot"]
RUN_SETTINGS = {"algorithm.generations": 2, "algorithm.refine_generations": 1,
                "algorithm.n_orientations": 5000, "algorithm.n_phase_loops": 1,
                "algorithm.n_er": 5, "algorithm.n_hio": 5, "algorithm.n_final_er": 5,
                "algorithm.cg_max_iter": 10, "evaluation.enabled": False,
                "output.progress_png": False}


def _commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def measure_case(M: int, n_images: int, ranks: int, data: Path, work: Path, bin_dir: Path,
                 extra: dict) -> dict:
    """Run one case and return its record (the run's metrics.json "memory" entry + case)."""
    out = work / f"run_M{M}_n{n_images}_r{ranks}"
    settings = dict(RUN_SETTINGS, **{"algorithm.M": M, "data.path": str(data)}, **extra)
    cmd = [str(bin_dir / "mpiexec"), "-n", str(ranks), str(bin_dir / "python"), "-m", "spinifel",
           "run", "--out", str(out), "--overwrite"]
    for k, v in settings.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"case M={M} n={n_images} failed:\n{r.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"M": M, "n_images": n_images, "ranks": ranks, "settings": settings,
            "memory": m["memory"], "peak_rss_per_generation_mib": [
                g["peak_rss_mib"] for g in m["generations"]],
            "command": shlex.join(cmd).replace(str(data), data.name).replace(str(out), "OUT"),
            "commit": _commit()}


def measure(args: argparse.Namespace) -> None:
    args.folder.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="spinifel_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    extra = dict(kv.split("=", 1) for kv in args.set)
    extra = {k: json.loads(v) for k, v in extra.items()}
    datasets: dict[int, Path] = {}
    sim = sim_args(args.pixels)
    for case in args.case:
        M, n = (int(x) for x in case.split(":"))
        if n not in datasets:
            px = "" if args.pixels == 32 else f"_px{args.pixels}"
            datasets[n] = work / f"demo_n{n}{px}.h5"
            if not datasets[n].exists():
                subprocess.run([str(bin_dir / "mpiexec"), "-n", str(args.ranks),
                                str(bin_dir / "python"), "-m", "spinifel", "simulate", "--out",
                                str(datasets[n]), "--n-images", str(n), *sim], check=True,
                               capture_output=True)
        rec = measure_case(M, n, args.ranks, datasets[n], work, bin_dir, extra)
        rec["simulate"] = shlex.join(["spinifel-mpi", "simulate", "--n-images", str(n), *sim])
        rec["pixels"] = args.pixels
        tag = args.tag and f"_{args.tag}"
        name = args.folder / f"M{M}_n{n}_r{args.ranks}{tag}.json"
        name.write_text(json.dumps(rec, indent=1) + "\n")
        mem = rec["memory"]
        print(f"M={M} n={n}: estimate {mem['estimate_max_mib']:.1f} MiB, peak "
              f"{mem['peak_rss_max_mib']:.1f} MiB, ratio {mem['peak_over_estimate']:.2f}",
              flush=True)


def reestimate(args: argparse.Namespace) -> None:
    bin_dir = Path(sys.executable).parent
    for path in sorted(args.folder.glob("*.json")):
        rec = json.loads(path.read_text())
        data = Path(args.work) / Path(rec["settings"]["data.path"]).name
        settings = dict(rec["settings"], **{"data.path": str(data)})
        cmd = [str(bin_dir / "mpiexec"), "-n", str(rec["ranks"]), str(bin_dir / "python"), "-m",
               "spinifel", "run", "--dry-run", "--out", str(Path(args.work) / "dry")]
        for k, v in settings.items():
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        plan = json.loads(r.stdout[r.stdout.index("{"):])
        est = plan["memory_per_rank_bytes"] / 2**20
        rec["estimate_now"] = {"estimate_rank0_mib": est, "commit": _commit(),
                               "peak_over_estimate": rec["memory"]["peak_rss_max_mib"] / est}
        path.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"{path.name}: estimate now {est:.1f} MiB, peak / estimate "
              f"{rec['estimate_now']['peak_over_estimate']:.2f}", flush=True)


HEADER = ("| M | pixels | images | ranks | lambdas | measured peak RSS per rank (MiB) | estimate when "
          "measured (MiB, largest rank) | peak / that estimate | estimate now (MiB) | peak / "
          "estimate now | commits (measured / estimate now) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table(folder: Path) -> str:
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    recs.sort(key=lambda r: (r.get("pixels", 32), r["M"], r["n_images"], r["ranks"],
                             len(r["settings"].get("algorithm.lambdas", [0]))))
    rows = []
    for r in recs:
        mem, now = r["memory"], r.get("estimate_now")
        lams = r["settings"].get("algorithm.lambdas", [0.1])
        est_now = (f"{now['estimate_rank0_mib']:.0f} | {now['peak_over_estimate']:.2f}"
                   if now else "- | -")
        rows.append(f"| {r['M']} | {r.get('pixels', 32)}x{r.get('pixels', 32)} | "
                    f"{r['n_images']} | {r['ranks']} | {len(lams)} | "
                    + ", ".join(f"{v:.0f}" for v in mem["peak_rss_per_rank_mib"])
                    + f" | {mem['estimate_max_mib']:.0f} | {mem['peak_over_estimate']:.2f} | "
                    f"{est_now} | {r['commit']} / {now['commit'] if now else '-'} |")
    return HEADER + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="run the cases and write one JSON per case")
    m.add_argument("folder", type=Path)
    m.add_argument("--case", action="append", required=True, metavar="M:N_IMAGES")
    m.add_argument("--ranks", type=int, default=2)
    m.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="extra run setting, e.g. algorithm.lambdas=[1e-3,1e-2,1e-1]")
    m.add_argument("--tag", default="", help="suffix of the JSON names")
    m.add_argument("--pixels", type=int, default=32,
                   help="detector side in pixels (the demo's area; default the demo's 32)")
    e = sub.add_parser("reestimate", help="add the current code's estimate to each JSON")
    e.add_argument("folder", type=Path)
    e.add_argument("--work", required=True, help="the scratch folder of `measure` (datasets)")
    t = sub.add_parser("table", help="print the table (and write it between markers)")
    t.add_argument("folder", type=Path)
    t.add_argument("--update", type=Path, nargs="*", default=[])
    args = p.parse_args(argv)
    if args.cmd == "measure":
        measure(args)
        return 0
    if args.cmd == "reestimate":
        reestimate(args)
        return 0
    text = table(args.folder)
    for path in args.update:
        doc = path.read_text()
        pat = re.compile(r"<!-- results:memory -->.*?<!-- /results:memory -->", re.S)
        if not pat.search(doc):
            raise SystemExit(f"{path}: no <!-- results:memory --> markers")
        path.write_text(pat.sub(lambda _: f"<!-- results:memory -->\n{text}\n"
                                          "<!-- /results:memory -->", doc, count=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
