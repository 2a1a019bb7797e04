"""``spinifel-mpi simulate``: write a ground-truth single-particle imaging dataset.

Example (2 ranks, 10,000 noisy 64 x 64 images of PDB 2CEX, about half a minute)::

    mpiexec -n 2 spinifel-mpi simulate --out 2cex.h5 --pdb 2cex.pdb \\
        --n-images 10000 --photons 1e5
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spinifel.simulate.presets import DETECTOR_PRESETS

DESCRIPTION = """\
Simulate single-particle X-ray diffraction patterns |F(R(q) s)|^2 of a molecule (a PDB/mmCIF
file or the built-in seeded protein-like molecule) at uniformly random orientations, on a
flat square detector, optionally with Poisson noise (with per-image fluence jitter and a flat
background), a beamstop and detector gaps, and write them in the original
SpiniFEL/skopi HDF5 layout plus a ground_truth group (density, 3D intensity, atoms).
The file is identical for any number of MPI ranks.
"""

EPILOG = """\
example:
  mpiexec -n 2 spinifel-mpi simulate --out 2cex.h5 --pdb 2cex.pdb --n-images 10000 --photons 1e5
  spinifel-mpi simulate --out demo.h5 --builtin --n-images 2000 --pixels 64 --beamstop 2
  photon-limited 2CEX (64x64, 2 mm, 0.2 m, 4.6 keV, beamstop 3 px) with log-normal fluence
  jitter, a flat background and a 4-row gap:
  spinifel-mpi simulate --out pl.h5 --pdb 2cex.pdb --detector photon-limited --n-images 5000 \
      --photons 2000 --fluence-sigma 0.5 --background 0.05 --gap-rows 4 --M 51
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``simulate`` to ``parser``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", required=True, type=Path, metavar="PATH",
                        help="output HDF5 file (written atomically; replaced if it exists)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--pdb", type=Path, metavar="FILE",
                     help="PDB or mmCIF file of the molecule (waters and hydrogens dropped)")
    src.add_argument("--builtin", action="store_true",
                     help="use the built-in seeded 2000-atom molecule (the default)")
    parser.add_argument("--n-images", type=int, default=1000, metavar="N",
                        help="number of images (default: %(default)s)")
    default = DETECTOR_PRESETS["default"]
    parser.add_argument("--detector", choices=sorted(DETECTOR_PRESETS), default="default",
                        help="named geometry setting --pixels, --pixel-size, --distance, "
                             "--energy and --beamstop (each may still be given): 'default' "
                             "= the values below; 'photon-limited' = 64x64 pixels of 2 mm at "
                             "0.2 m, 4.6 keV, beamstop radius 3 (issue 13's benchmark)")
    parser.add_argument("--pixels", type=int, default=None, metavar="N",
                        help=f"detector is N x N pixels (default: {default['n_pixels']})")
    parser.add_argument("--pixel-size", type=float, default=None, metavar="M",
                        help=f"pixel pitch in metres (default: {default['pixel_size_m']})")
    parser.add_argument("--distance", type=float, default=None, metavar="M",
                        help=f"detector distance in metres (default: {default['distance_m']})")
    parser.add_argument("--energy", type=float, default=None, metavar="EV",
                        help=f"photon energy in eV (default: {default['photon_energy_ev']})")
    parser.add_argument("--photons", type=float, default=None, metavar="P",
                        help="mean particle photons per image with Poisson noise "
                             "(default: noise-free |F|^2)")
    jit = parser.add_mutually_exclusive_group()
    jit.add_argument("--jitter", type=float, default=0.0, metavar="J",
                     help="log-normal per-image fluence (mean 1) with relative std J "
                          "(default: %(default)s)")
    jit.add_argument("--fluence-sigma", type=float, default=0.0, metavar="S",
                     help="log-normal per-image fluence (mean 1) with std S of its logarithm; "
                          "the true fluences are written to the dataset 'fluences'")
    parser.add_argument("--background", type=float, default=0.0, metavar="B",
                        help="flat background: B photons per good pixel added to the expected "
                             "counts before the Poisson draw (needs --photons; default: "
                             "%(default)s)")
    parser.add_argument("--beamstop", type=float, default=None, metavar="R",
                        help="beamstop radius in pixels, masked (default: "
                             f"{default['beamstop_radius_px']})")
    parser.add_argument("--gap-rows", type=int, default=0, metavar="N",
                        help="horizontal detector gap of N rows through the centre, masked "
                             "(default: %(default)s)")
    parser.add_argument("--gap-cols", type=int, default=0, metavar="N",
                        help="vertical detector gap of N columns through the centre, masked "
                             "(default: %(default)s)")
    parser.add_argument("--M", type=int, default=41, metavar="M",
                        help="odd size of the ground-truth grid (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write PATH.patterns.png")


def geometry_from_args(args: argparse.Namespace) -> dict:
    """Detector keyword arguments of :func:`simulate_dataset`: the preset, then explicit flags.

    Returns ``n_pixels``, ``pixel_size_m``, ``distance_m``, ``photon_energy_ev`` and
    ``beamstop_radius_px`` of ``args.detector``, each replaced by its flag when given.
    """
    geo = dict(DETECTOR_PRESETS[args.detector])
    flags = {"n_pixels": args.pixels, "pixel_size_m": args.pixel_size,
             "distance_m": args.distance, "photon_energy_ev": args.energy,
             "beamstop_radius_px": args.beamstop}
    geo.update({k: v for k, v in flags.items() if v is not None})
    return geo


def _threads_per_rank(node_size: int) -> int:
    """Cores of this node shared among its ranks (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, node_size))


def main(args: argparse.Namespace) -> int:
    """Run ``simulate``; returns the exit code (0)."""
    from spinifel.parallel.context import ParallelContext, collective
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule, load_structure

    ctx = ParallelContext.from_world()
    # Every rank reads the structure; an unreadable file is reported once, on all ranks.
    structure = collective(ctx.comm, load_structure, args.pdb) if args.pdb is not None \
        else builtin_molecule(seed=args.seed)
    summary = simulate_dataset(
        args.out, structure, n_images=args.n_images, **geometry_from_args(args),
        photons_per_image=args.photons, fluence_jitter=args.jitter,
        fluence_sigma=args.fluence_sigma, background_photons_per_pixel=args.background,
        gap_rows=args.gap_rows, gap_cols=args.gap_cols, M=args.M, seed=args.seed,
        comm=ctx.comm, workers=_threads_per_rank(ctx.node_size), detector_name=args.detector)
    if ctx.is_root:
        plot = None
        if not args.no_plot:
            from spinifel.simulate.plots import plot_patterns

            plot = plot_patterns(summary["path"])
        print(format_summary(summary, plot))
    return 0


def format_summary(summary: dict, plot: Path | None = None) -> str:
    """One paragraph describing a :func:`simulate_dataset` summary."""
    n = summary["det_shape"][-1]
    photons = summary["photons_per_image"]
    noise = (f"Poisson noise, {photons:g} photons per image requested, "
             f"{summary['mean_photons']:.4g} recorded on average"
             if photons is not None else "noise-free |F|^2")
    if summary.get("background_photons", 0) > 0:
        noise += f" (of which {summary['background_photons']:.4g} background)"
    text = (f"Simulated {summary['n_images']} images of {summary['structure_name']} "
            f"({summary['n_atoms']} atoms) on a {n}x{n} detector, {noise}; resolution "
            f"{summary['resolution_edge_angstrom']:.2f} A at the edge and "
            f"{summary['resolution_corner_angstrom']:.2f} A at the corner "
            f"(reciprocal extent {summary['reciprocal_extent']:.4g} 1/m, ground truth "
            f"{summary['M']}^3 voxels of {summary['voxel_size_angstrom']:.2f} A). "
            f"{summary['seconds']:.1f} s on {summary['n_ranks']} rank(s) "
            f"({summary['images_per_second']:.0f} images/s). Wrote {summary['path']}")
    if plot is not None:
        text += f" and {plot}"
    return text + "."
