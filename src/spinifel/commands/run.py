"""Reconstruct a dataset: ``mpiexec -n P spinifel-mpi run CONFIG.toml [--set KEY=VALUE ...]``.

Every rank reads only its own contiguous block of images. Rank 0 writes OUT/result.h5,
OUT/density.mrc, OUT/intensity.mrc and OUT/metrics.json after every generation.

examples:
  spinifel-mpi run examples/quickstart.toml
  mpiexec -n 4 spinifel-mpi run run.toml --set data.path=/data/2cex.h5 --out out_2cex
  spinifel-mpi run run.toml --dry-run          # validate config + dataset, print the plan
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("spinifel")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run configuration (TOML); defaults if omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), parsed with the key's type")
    parser.add_argument("--out", help="output directory (same as --set output.dir=DIR)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous result in the output directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.h5 (same dataset and [algorithm]; "
                        "any number of ranks)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check config and dataset, print the plan, reconstruct nothing")


def resolve_config(args: argparse.Namespace, extra: dict | None = None):
    from spinifel.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"output.dir={args.out}")
    return load_config(args.config, overrides, extra)


def main(args: argparse.Namespace) -> int:
    from spinifel.parallel.context import ParallelContext, collective
    from spinifel.pipeline import run_pipeline
    from spinifel.runtime import configure_threads

    ctx = ParallelContext.from_world()
    cfg = collective(ctx.comm, resolve_config, args)
    configure_threads(cfg.runtime.threads_per_rank)
    if args.dry_run:
        plan = run_pipeline(cfg, ctx, dry_run=True)
        if ctx.is_root:
            print(json.dumps(plan, indent=2))
        return 0
    summary = run_pipeline(cfg, ctx, overwrite=args.overwrite, resume=args.resume)
    if ctx.is_root:
        log.info("done: %d generations, results in %s", summary["generations"], summary["out_dir"])
        ev = summary.get("evaluation")
        if ev and cfg.evaluation.min_correlation > 0:
            if ev.get("density_correlation", 0.0) < cfg.evaluation.min_correlation:
                log.error("density correlation %.3f is below evaluation.min_correlation %.3f",
                          ev.get("density_correlation", 0.0), cfg.evaluation.min_correlation)
                return 3
    return 0
