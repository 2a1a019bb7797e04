#!/usr/bin/env python3
"""Dragonfly EMC and spinifel-mpi side by side on the same frames and cores, from their JSONs.

Usage::

    python scripts/peer_side_by_side.py RUN_DIR PEER.json [PEER.json ...] [--update docs/results.md]

Each ``PEER.json`` is written by ``scripts/peer_dragonfly.py evaluate`` (Dragonfly's orientation
errors against the truth, its 3D intensity correlation, its wall time and threads);
``RUN_DIR`` holds one spinifel-mpi run's ``metrics.json``, ``config.toml`` and
``provenance.json`` on the same file and frames. The block reports, per Dragonfly run, our
stage seconds up to the first generation whose median orientation error is at or below its
final one, and our whole run (with the density, which Dragonfly does not phase). Text goes between
``<!-- results:peer_time -->`` and ``<!-- /results:peer_time -->``. Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import update  # noqa: E402  (scripts/results.py: the marker-block writer)


def first_at_or_below(gens: list[dict], target: float) -> tuple[int, float, float] | None:
    """(generation number from 1, stage seconds so far, median error) of the first
    generation whose median orientation error is at or below ``target`` degrees."""
    t = 0.0
    for g in gens:
        t += sum(v for v in g["timings"].values() if v)
        med = ((g.get("evaluation") or {}).get("orientation_error_deg") or {}).get("median")
        if med is not None and med <= target:
            return g["generation"] + 1, t, med
    return None


def block(peer_paths: list[Path], run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    cfg = tomllib.loads((run / "config.toml").read_text())
    prov = json.loads((run / "provenance.json").read_text())
    gens = m["generations"]
    total = sum(sum(v for v in g["timings"].values() if v) for g in gens)
    ev = gens[-1].get("evaluation") or {}
    oe = ev.get("orientation_error_deg") or {}
    peers = [(p, json.loads(p.read_text())) for p in peer_paths]
    d0 = peers[0][1]
    lines = [
        f"Data `{Path(d0['data_file']).name}`, the {d0['frames_used']} frames, "
        f"{d0['run']['nproc']} cores. spinifel-mpi: `{run.as_posix()}` (`{prov['command']}`, "
        f"commit {prov['commit']}, {m['n_ranks']} ranks, "
        f"{cfg['algorithm'].get('n_orientations')} orientations + refinement). Seconds: "
        "Dragonfly's wall time of `emc`; ours, the sum of rank 0's stage times. Each "
        "Dragonfly row is one run (its JSON, commit, threads and the load average before it "
        "in the row); its random start is seeded from the clock.", "",
        "| program | run | result | median orientation error (deg) | p90 (deg) | seconds, "
        "whole run | our seconds to this median error | 3D intensity CC | density CC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path, d in peers:
        r = d["run"]
        target = d["orientation_error_deg"]["median"]
        hit = first_at_or_below(gens, target)
        reach = ("not reached" if hit is None else
                 f"generation {hit[0]}: {hit[1]:.0f} s (median {hit[2]:.1f} deg)")
        lines.append(
            f"| Dragonfly EMC ({d['dragonfly_commit'][:7]}, {r['threads']} thread(s), load "
            f"{r['loadavg_before'][0]:.1f}, {d['n_orientations']} orientations, "
            f"{d['iterations']} iterations) | `{path.as_posix()}` | 3D intensity | "
            f"{target:.1f} | {d['orientation_error_deg']['p90']:.1f} | {r['wall_s']:.0f} | "
            f"{reach} | {d['intensity_cc_vs_truth']['cc']:.3f} | - (no phasing) |")
    lines.append(
        f"| spinifel-mpi, Poisson score | `{run.as_posix()}` | density | "
        f"{oe.get('median', float('nan')):.1f} | {oe.get('p90', float('nan')):.1f} | "
        f"{total:.0f} | - | - | {ev.get('density_correlation', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("peers", type=Path, nargs="+")
    p.add_argument("--update", type=Path, nargs="*", default=[])
    args = p.parse_args(argv)
    text = block(args.peers, args.run)
    for path in args.update:
        update(path, "peer_time", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
