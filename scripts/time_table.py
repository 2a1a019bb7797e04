#!/usr/bin/env python3
"""Time to solution of whole runs, from their JSONs: when each run first reached a density
correlation threshold, and at what cost.

Usage::

    python scripts/time_table.py RUN_DIR ... [--threshold 0.85] [--update docs/performance.md]

Each RUN_DIR holds one run's ``metrics.json`` (per-generation stage timings and evaluation),
its resolved ``config.toml`` and ``provenance.json`` (command and commit). The seconds are the
sum of rank 0's stage times (the wall time of the generations up to that point, less the
reading of the data and start-up). Text goes between ``<!-- results:time -->`` and
``<!-- /results:time -->``. Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import update  # noqa: E402  (scripts/results.py: the marker-block writer)


def row(run: Path, threshold: float) -> str:
    m = json.loads((run / "metrics.json").read_text())
    a = tomllib.loads((run / "config.toml").read_text())["algorithm"]
    prov = run / "provenance.json"
    commit = json.loads(prov.read_text())["commit"] if prov.is_file() else "-"
    t, first = 0.0, None
    for g in m["generations"]:
        t += sum(v for v in g["timings"].values() if v)
        cc = (g.get("evaluation") or {}).get("density_correlation")
        if first is None and cc is not None and cc >= threshold:
            first = (g["generation"] + 1, t, cc)
    ev = m["generations"][-1].get("evaluation") or {}
    med = (ev.get("orientation_error_deg") or {}).get("median", float("nan"))
    reached = (f"generation {first[0]}: {first[1]:.0f} s (CC {first[2]:.3f})" if first
               else "not reached")
    return (f"| `{run.name}` | {m['n_images']} | {a['score']} | {a['generations']} | "
            f"{a['refine_generations']} | {a['match_resolution_ramp']} | {a['n_phase_loops']} | "
            f"{reached} | {t:.0f} | {ev.get('density_correlation', float('nan')):.3f} | "
            f"{med:.1f} | {commit} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--update", type=Path, nargs="*", default=[])
    args = p.parse_args(argv)
    head = (f"| run | images | score | generations | refine generations | resolution ramp | "
            f"phasing loops | first CC >= {args.threshold:g} (stage seconds so far) | "
            "all generations (stage seconds) | final CC | final median error (deg) | commit |\n"
            "|" + " --- |" * 12)
    text = head + "\n" + "\n".join(row(r, args.threshold) for r in args.runs)
    for path in args.update:
        update(path, "time", text)  # between <!-- results:NAME --> markers
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
