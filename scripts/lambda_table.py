#!/usr/bin/env python3
"""Tabulate the effect of the Tikhonov weight on whole runs, from their JSONs.

Usage::

    python scripts/lambda_table.py docs/data/lambda [--update docs/algorithm.md]

Each subfolder holds one run's ``metrics.json``, its resolved ``config.toml`` and its
``provenance.json`` (command and commit). One row per run, sorted by lambda: the data, the
lambdas swept, the lambda_rel chosen in each generation, and the last generation's density
correlation, FSC resolutions ("not reached" when the curve stays above the threshold) and
orientation errors. Text goes between ``<!-- results:lambda -->`` and
``<!-- /results:lambda -->``. Nothing is typed by hand.
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


def row(run: Path) -> tuple[float, str]:
    m = json.loads((run / "metrics.json").read_text())
    cfg = tomllib.loads((run / "config.toml").read_text())
    prov = json.loads((run / "provenance.json").read_text())
    gens = m["generations"]
    ev = gens[-1].get("evaluation") or {}
    oe = ev.get("orientation_error_deg") or {}
    lams = cfg["algorithm"]["lambdas"]
    chosen = ", ".join(f"{g['lambda_rel']:g}" for g in gens)
    minutes = sum(sum(v for v in g["timings"].values() if v) for g in gens) / 60
    return lams[0], (f"| `{run.name}` | {Path(cfg['data']['path']).name} | {m['n_images']} | "
                     f"{', '.join(f'{x:g}' for x in lams)} | {chosen} | {len(gens)} | "
                     f"{ev.get('density_correlation', float('nan')):.3f} | {_res(ev, '0p5')} | "
                     f"{_res(ev, '0p143')} | {oe.get('median', float('nan')):.1f} | "
                     f"{oe.get('p90', float('nan')):.1f} | {minutes:.0f} | {prov['commit']} |")


HEADER = ("| run | data | images | lambdas | lambda_rel per generation | generations | density CC | "
          "FSC 0.5 | FSC 0.143 | median error (deg) | p90 (deg) | minutes (stage sum) | commit |\n"
          "|" + " --- |" * 13)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--update", type=Path, nargs="*", default=[])
    args = p.parse_args(argv)
    runs = sorted(d for d in args.folder.iterdir() if (d / "metrics.json").is_file())
    text = HEADER + "\n" + "\n".join(r for _, r in sorted(row(d) for d in runs))
    for path in args.update:
        update(path, "lambda", text)  # between <!-- results:NAME --> markers
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
