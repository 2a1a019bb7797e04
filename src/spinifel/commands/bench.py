"""Time every stage against the hardware limits measured in the same run (issue 5).

Not available in this version: the command exists so that job scripts can name it; it
exits with an error rather than printing made-up numbers.

examples:
  mpiexec -n 2 spinifel-mpi bench      # not implemented yet: exits 2 with a message
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write the measurements to this JSON file")


def main(args: argparse.Namespace) -> int:
    from spinifel.errors import SpinifelError

    raise SpinifelError("bench is not implemented in this version yet; per-stage timings of a "
                        "real run are in OUT/metrics.json")
