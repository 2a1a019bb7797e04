"""Command-line front end: ``spinifel-mpi SUBCOMMAND ...`` (also ``python -m spinifel``).

Each subcommand is a module in :mod:`spinifel.commands` with ``add_args(parser)`` and
``main(args) -> int``. This module parses, sets up rank-aware logging and turns user
errors (:class:`~spinifel.errors.SpinifelError`) into one line on stderr and exit code 2.
An error raised on one rank only ends the whole MPI job (``Abort``) so nothing hangs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spinifel import __version__

# name -> (module, one-line help, needs MPI)
COMMANDS = {
    "run": ("spinifel.commands.run", "reconstruct a dataset (mpiexec -n P spinifel-mpi run CONFIG)", True),
    "demo": ("spinifel.commands.demo", "simulate the built-in molecule and reconstruct it", True),
    "simulate": ("spinifel.commands.simulate", "simulate a single-particle imaging dataset", True),
    "evaluate": ("spinifel.commands.evaluate", "compare a result with ground truth", False),
    "info": ("spinifel.commands.info", "describe a dataset", False),
    "config": ("spinifel.commands.config_cmd", "print the resolved config or the defaults", False),
    "bench": ("spinifel.commands.bench", "time every stage against the hardware limits", True),
}

EPILOG = """examples:
  spinifel-mpi demo --out demo_out                     # simulate + reconstruct the built-in molecule
  spinifel-mpi simulate --out data.h5 --n-images 2000  # a ground-truth dataset
  mpiexec -n 4 spinifel-mpi run config.toml --set algorithm.generations=20
  spinifel-mpi evaluate spinifel_out --truth data.h5
  spinifel-mpi config --defaults                       # every key, documented
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinifel-mpi", description="M-TIP reconstruction of single-particle X-ray "
        "diffraction data over MPI.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spinifel-mpi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on rank 0")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (modname, helptext, _) in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=helptext, description=(mod.__doc__ or helptext).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(_module=mod, _needs_mpi=COMMANDS[name][2])
    return parser


def main(argv: list[str] | None = None) -> int:
    from spinifel.errors import SpinifelError
    from spinifel.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    from spinifel.parallel.context import ParallelContext, init_mpi, world

    if args._needs_mpi:
        init_mpi()
    rank, size, comm = world()
    setup_logging(rank, size, verbose=args.verbose, quiet=args.quiet)
    if comm is not None and size > 1:
        ParallelContext(comm=comm).install_excepthook()
    try:
        return int(args._module.main(args) or 0)
    except SpinifelError as e:
        collective = getattr(e, "collective", False)
        if rank == 0 or not collective:
            prefix = f"[rank {rank}/{size}] " if size > 1 else ""
            print(f"spinifel-mpi: error: {prefix}{e}", file=sys.stderr, flush=True)
        if size > 1 and not collective:
            ParallelContext(comm=comm).abort(e.exit_code)
        return e.exit_code
    except BrokenPipeError:
        # `spinifel-mpi info x.h5 --json | head`: the reader went away; not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        if size > 1:
            ParallelContext(comm=comm).abort(130)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
