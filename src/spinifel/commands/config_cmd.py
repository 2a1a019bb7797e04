"""Print the fully resolved configuration as TOML, or the documented defaults.

examples:
  spinifel-mpi config --defaults > my_run.toml      # every key with its documentation
  spinifel-mpi config my_run.toml --set algorithm.M=61
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run configuration (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable)")
    parser.add_argument("--defaults", action="store_true", help="print the documented defaults file")


def main(args: argparse.Namespace) -> int:
    from spinifel.config import defaults_text, load_config

    if args.defaults:
        print(defaults_text(), end="")
        return 0
    print(load_config(args.config, args.overrides).to_toml(), end="")
    return 0
