"""``spinifel-mpi evaluate OUT --truth DATASET.h5 | --pdb FILE``: compare a result with truth.

Serial (no MPI). Reads ``OUT/result.h5``, aligns the reconstruction to the ground truth
(global rotation from the orientations or by an intensity search, then hand and shift),
writes ``OUT/evaluation.json`` and PNG plots, and prints a short summary. Costs a few
seconds for M = 41 (tens of seconds for M = 81 without truth orientations).

examples:
  spinifel-mpi evaluate spinifel_out --truth data.h5
  spinifel-mpi evaluate spinifel_out --pdb 2cex.pdb --no-plots --json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from spinifel.evaluate.fsc import describe_resolution


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the ``evaluate`` arguments on ``parser``."""
    parser.add_argument("out_dir", help="result directory of `spinifel-mpi run` (holds result.h5)")
    parser.add_argument("--truth", metavar="DATASET.h5", default=None,
                        help="dataset with a ground_truth group and true orientations "
                             "(with --pdb: only its orientations are used)")
    parser.add_argument("--pdb", metavar="FILE", default=None,
                        help="structure file (PDB/mmCIF) rendered on the result's grid as truth")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--json", action="store_true",
                        help="print the full evaluation as JSON instead of the summary")


def _fmt(v: Any, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def summary_lines(ev: dict[str, Any]) -> list[str]:
    """Human-readable lines for an evaluation dict."""
    lines = [
        f"truth: {ev.get('truth_name')} ({ev.get('truth_source')})",
        f"density correlation: {_fmt(ev.get('density_correlation'), '.3f')} "
        f"(in mask {_fmt(ev.get('density_correlation_in_mask'), '.3f')}, "
        f"hand: {ev.get('density_hand')})",
        f"FSC resolution: {describe_resolution(ev, 'fsc_resolution_0p5')} at 0.5, "
        f"{describe_resolution(ev, 'fsc_resolution_0p143')} at 0.143 "
        f"(Nyquist {_fmt(ev.get('nyquist_resolution_angstrom'), '.2f', ' A')})",
        f"intensity correlation: {_fmt(ev.get('intensity_correlation'), '.3f')} linear, "
        f"{_fmt(ev.get('intensity_log_correlation'), '.3f')} log",
    ]
    oe = ev.get("orientation_error_deg")
    if oe:
        within = oe.get("frac_within_grid_spacing")
        lines.append(
            f"orientation error: median {_fmt(oe.get('median'), '.2f', ' deg')}, "
            f"p90 {_fmt(oe.get('p90'), '.2f', ' deg')}"
            + ("" if within is None else
               f", {100 * within:.1f}% within the grid spacing "
               f"{oe.get('grid_spacing_deg'):.2f} deg")
            + f" (convention: {ev.get('orientation_convention')})")
    else:
        lines.append("orientation error: n/a (global rotation found by intensity search)")
    return lines


def main(args: argparse.Namespace) -> int:
    """Run the evaluation; returns the exit code (user errors propagate as SpinifelError)."""
    from pathlib import Path

    from spinifel.evaluate.report import evaluate_result

    ev = evaluate_result(args.out_dir, truth_path=args.truth, pdb=args.pdb,
                         plots=not args.no_plots)
    if args.json:
        print(json.dumps(ev, indent=2))
        return 0
    for line in summary_lines(ev):
        print(line)
    out = Path(args.out_dir)
    print(f"written: {out / 'evaluation.json'}")
    if ev.get("plots"):
        print(f"plots in {out}: {', '.join(ev['plots'])}")
    return 0
