#!/usr/bin/env python3
"""Print (or write between markers) the photon-limited results table from the runs' JSONs.

Usage::

    python scripts/photon_table.py docs/data/photon [--update docs/results.md] [--block NAME]

Each subfolder of the given folder holds one run's ``metrics.json`` (written by
``spinifel-mpi run``) and its resolved ``config.toml`` (the ``config`` attribute of its
``result.h5``). The table row is read from the last generation's ``evaluation`` and
``posterior`` entries; stage seconds are summed over generations. A resolution the FSC
never drops to is printed "not reached". The grid sampling floor is computed here: the
median angle from 20,000 seeded random orientations to the nearest orientation of the run's
grid. Nothing in the table is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import update  # noqa: E402  (scripts/results.py: the marker-block writer)


def _res(ev: dict, key: str) -> str:
    v = ev.get(f"fsc_resolution_{key}_angstrom")
    if v is None:
        b = ev.get(f"fsc_resolution_{key}_better_than_angstrom")
        return f"not reached (better than {b:.1f} A)" if b else "not reached"
    return f"{v:.1f} A"


def _f(v, fmt: str) -> str:
    """``v`` formatted, or "n/a" when the run did not record it (None or NaN)."""
    return "n/a" if v is None or v != v else format(v, fmt)


_FLOORS: dict[int, float] = {}


def sampling_floor_deg(n_orientations: int, n_random: int = 20000, seed: int = 0) -> float:
    """Median angle (deg) from seeded random orientations to the nearest orientation of the
    matching grid of ``n_orientations``: the error of a perfect search confined to the grid."""
    if n_orientations not in _FLOORS:
        import numpy as np

        from spinifel.geometry.orientations import orientation_grid, random_quaternions

        grid = orientation_grid(n_orientations)
        q = random_quaternions(n_random, np.random.default_rng(seed))
        best = np.zeros(n_random)
        for a in range(0, n_random, 2000):
            best[a:a + 2000] = np.abs(q[a:a + 2000] @ grid.T).max(axis=1)
        _FLOORS[n_orientations] = float(np.median(np.degrees(2 * np.arccos(np.clip(best, 0, 1)))))
    return _FLOORS[n_orientations]


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    cfg = tomllib.loads((run / "config.toml").read_text())
    a = cfg["algorithm"]
    gens = m["generations"]
    last = gens[-1]
    ev = last.get("evaluation") or {}
    oe = ev.get("orientation_error_deg") or {}
    seconds = sum(sum(v for v in g["timings"].values() if v) for g in gens)
    bg = (last.get("posterior") or {}).get("background_photons_per_pixel")
    bg_text = "" if bg is None else f" (estimated {bg:.3f} photons/pixel"
    rep = m.get("background_from_data")
    if bg is not None and rep and rep.get("used") and isinstance(rep["photons_per_pixel"], list):
        per_shell = [b for b, n in zip(rep["photons_per_pixel"], rep["shell_pixels"]) if n > 0]
        bg_text += f" on average; {min(per_shell):.3f}-{max(per_shell):.3f} over the shells"
    bg_text += "" if bg is None else ")"

    def poisson(v):  # settings that only the Poisson score reads
        return v if a.get("score") == "poisson" else "-"
    return (f"| `{run.name}` | {Path(cfg['data']['path']).name} | {m['n_images']} | "
            f"{a.get('score', 'euclidean')} | {a.get('M')} | {poisson(a.get('beta_start'))} | "
            f"{poisson(a.get('orientations_per_image'))} | {a.get('refine_rounds', '')} | "
            f"{','.join(f'{x:g}' for x in a.get('lambdas', []))} | "
            f"{a.get('background', 'none')}"
            f"{bg_text} | "
            f"{len(gens)}/{m['n_generations']} | "
            f"{_f(ev.get('density_correlation'), '.3f')} | {_res(ev, '0p5')} | "
            f"{_res(ev, '0p143')} | {_f(oe.get('median'), '.1f')} | "
            f"{_f(oe.get('p90'), '.1f')} | {_f(m.get('grid_spacing_deg'), '.1f')} | "
            f"{sampling_floor_deg(a['n_orientations']):.1f} | "
            f"{_f(last.get('orientation_change'), '.3f')} | {seconds / 60:.0f} | "
            f"{_commit(run)} |")


def _commit(run: Path) -> str:
    """The commit recorded in the run's ``provenance.json`` ("-" when there is none)."""
    prov = run / "provenance.json"
    return json.loads(prov.read_text())["commit"] if prov.is_file() else "-"


HEADER = ("| run | data | images | score | M | beta_start | kept cap | refine rounds | lambdas | "
          "background | generations | density CC | "
          "FSC 0.5 | FSC 0.143 | median error (deg) | p90 (deg) | grid spacing (deg) | "
          "grid sampling floor (deg) | orientation change, last generation | "
          "stage minutes (sum) | commit |\n"
          "|" + " --- |" * 21)


# the issue's table: per photon count the Poisson example config and today's hard engine
SUMMARY_ROWS = [("500", "p500_n5000_refine_example", "p500_n5000_hard_euclidean_defaults"),
                ("1,000", "p1000_n5000_refine_example", "p1000_n5000_hard_euclidean_defaults"),
                ("2,000", "p2000_n5000_refine_example", "p2000_n5000_hard_euclidean_defaults"),
                ("5,000", "p5000_n5000_refine_example", "p5000_n5000_hard_euclidean_defaults"),
                ("10,000", "p10000_n5000_refine_example", "p10000_n5000_euclidean_defaults"),
                ("2,000 + jitter 0.5, background 0.05, 4-row gap",
                 "p2000_jitter_bg_gap_n5000_refine_example_bgfix",
                 "p2000_jitter_bg_gap_n5000_hard_euclidean_defaults"),
                ("the same, background fitted against the model (before the fix)",
                 "p2000_jitter_bg_gap_n5000_refine_example", None)]

SUMMARY_HEADER = ("| photons per image | engine | run | generations | density CC | FSC 0.5 | "
                  "FSC 0.143 | median error (deg) | p90 (deg) | minutes (sum of stage times) | "
                  "commit | background estimate (photons/pixel) |\n|" + " --- |" * 12)


def summary_row(photons: str, engine: str, run: Path) -> str:
    """One line of the summary table; "not run" when the run's folder is absent."""
    if not (run / "metrics.json").is_file():
        return f"| {photons} | {engine} | `{run.name}` | not run | | | | | | | | |"
    m = json.loads((run / "metrics.json").read_text())
    gens = m["generations"]
    ev = gens[-1].get("evaluation") or {}
    oe = ev.get("orientation_error_deg") or {}
    seconds = sum(sum(v for v in g["timings"].values() if v) for g in gens)
    commit = _commit(run)
    bg = (gens[-1].get("posterior") or {}).get("background_photons_per_pixel")
    return (f"| {photons} | {engine} | `{run.name}` | {len(gens)}/{m['n_generations']} | "
            f"{_f(ev.get('density_correlation'), '.3f')} | {_res(ev, '0p5')} | "
            f"{_res(ev, '0p143')} | {_f(oe.get('median'), '.1f')} | {_f(oe.get('p90'), '.1f')} | "
            f"{seconds / 60:.0f} | {commit} | {'-' if bg is None else f'{bg:.3f}'} |")


def summary(folder: Path) -> str:
    lines = [SUMMARY_HEADER]
    for photons, poisson, hard in SUMMARY_ROWS:
        bg = ", background = flat" if "jitter" in poisson else ""
        lines.append(summary_row(photons, f"Poisson (examples/photon_limited.toml{bg})",
                                 folder / poisson))
        if hard:
            lines.append(summary_row(photons, "hard, Euclidean defaults (M = 51)", folder / hard))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--update", type=Path, nargs="*", default=[])
    p.add_argument("--block", default="photon",
                   help="marker name: the table replaces <!-- results:NAME --> .. <!-- /results:NAME -->")
    p.add_argument("--summary", action="store_true",
                   help="the per-photon-count table (Poisson example vs hard engine) instead "
                        "of every run")
    args = p.parse_args(argv)
    runs = sorted(d for d in args.folder.iterdir() if (d / "metrics.json").is_file())
    if args.summary:
        text = summary(args.folder)
    else:
        text = HEADER + "\n" + "\n".join(row(r) for r in runs)
    for path in args.update:
        update(path, args.block, text)  # between <!-- results:NAME --> markers
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
