"""``spinifel-mpi simulate``: write a ground-truth single-particle imaging dataset.

Example (2 ranks, 10,000 noisy 64 x 64 images of PDB 2CEX, about half a minute)::

    mpiexec -n 2 spinifel-mpi simulate --out 2cex.h5 --pdb 2cex.pdb \\
        --n-images 10000 --photons 1e5
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spinifel.geometry import detector as det

DESCRIPTION = """\
Simulate single-particle X-ray diffraction patterns |F(R(q) s)|^2 of a molecule (a PDB/mmCIF
file or the built-in seeded protein-like molecule) at uniformly random orientations, on a
flat square detector, optionally with Poisson noise, and write them in the original
SpiniFEL/skopi HDF5 layout plus a ground_truth group (density, 3D intensity, atoms).
The file is identical for any number of MPI ranks.
"""

EPILOG = """\
example:
  mpiexec -n 2 spinifel-mpi simulate --out 2cex.h5 --pdb 2cex.pdb --n-images 10000 --photons 1e5
  spinifel-mpi simulate --out demo.h5 --builtin --n-images 2000 --pixels 64 --beamstop 2
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
    parser.add_argument("--pixels", type=int, default=det.DEFAULT_N_PIXELS, metavar="N",
                        help="detector is N x N pixels (default: %(default)s)")
    parser.add_argument("--pixel-size", type=float, default=det.DEFAULT_PIXEL_SIZE_M,
                        metavar="M", help="pixel pitch in metres (default: %(default)s)")
    parser.add_argument("--distance", type=float, default=det.DEFAULT_DISTANCE_M,
                        metavar="M", help="detector distance in metres (default: %(default)s)")
    parser.add_argument("--energy", type=float, default=det.DEFAULT_PHOTON_ENERGY_EV,
                        metavar="EV", help="photon energy in eV (default: %(default)s)")
    parser.add_argument("--photons", type=float, default=None, metavar="P",
                        help="mean photons per image with Poisson noise "
                             "(default: noise-free |F|^2)")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="J",
                        help="relative std of the per-image fluence (default: %(default)s)")
    parser.add_argument("--beamstop", type=float, default=0.0, metavar="R",
                        help="beamstop radius in pixels, masked (default: %(default)s)")
    parser.add_argument("--M", type=int, default=41, metavar="M",
                        help="odd size of the ground-truth grid (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write PATH.patterns.png")


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
        args.out, structure, n_images=args.n_images, n_pixels=args.pixels,
        pixel_size_m=args.pixel_size, distance_m=args.distance,
        photon_energy_ev=args.energy, photons_per_image=args.photons,
        fluence_jitter=args.jitter, beamstop_radius_px=args.beamstop, M=args.M,
        seed=args.seed, comm=ctx.comm, workers=_threads_per_rank(ctx.node_size))
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
