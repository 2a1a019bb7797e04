"""``spinifel-mpi info DATASET``: describe a dataset without reading its images.

The dataset may be in the skopi layout or a CXI file (detected, or named with
``--format``); for CXI the geometry read from the file (wavelength, module corners and
basis vectors) is reported too.

Prints the datasets' shapes and dtypes, the image count, the detector shape before and
after clipping/binning, the number of masked pixels, the reciprocal extent and the
resolution reached at the detector edge and corner. ``--json`` prints one JSON object
instead. Reads metadata, positions and mask only (no image is read), on one process.

Resolution definitions (``|s| = 2 sin(theta) / lambda``, so resolution ``d = 1 / |s|``),
computed on the clipped and binned detector, over all pixels, masked or not:

* corner resolution = ``1 / max |s|`` over all pixels (the reciprocal extent): the finest
  detail recorded anywhere, typically in the detector corners;
* edge resolution = ``1 / min_p e_p`` where ``e_p`` is the largest ``|s|`` among the
  midpoints of panel ``p``'s four borders (the pixels in its first/last row at the middle
  column(s) and in its first/last column at the middle row(s); both middle indices when a
  size is even). For one centred panel this is the resolution of the full ring inscribed
  in the detector.

examples:
  spinifel-mpi info data.h5
  spinifel-mpi info data.h5 --clip 8 --binning 1 --json
  spinifel-mpi info run42.cxi
"""

from __future__ import annotations

import argparse
import json
import math

import h5py
import numpy as np

from spinifel.io.dataset import DetectorGeometry, inspect_dataset, read_geometry

ANGSTROM_PER_METRE = 1e10


def edge_and_corner_s(geometry: DetectorGeometry) -> tuple[float, float]:
    """``(edge |s|, corner |s|)`` in inverse metres, as defined in the module docstring."""
    n_panels, h, w = geometry.shape
    s = np.sqrt((np.asarray(geometry.positions) ** 2).sum(axis=0)).reshape(n_panels, h, w)
    mid_r = sorted({(h - 1) // 2, h // 2})
    mid_c = sorted({(w - 1) // 2, w // 2})
    per_panel = []
    for p in range(n_panels):
        pts = [s[p, 0, c] for c in mid_c] + [s[p, h - 1, c] for c in mid_c]
        pts += [s[p, r, 0] for r in mid_r] + [s[p, r, w - 1] for r in mid_r]
        per_panel.append(max(pts))
    return float(min(per_panel)), float(geometry.reciprocal_extent)


def _resolution_angstrom(s_inv_m: float) -> float | None:
    return ANGSTROM_PER_METRE / s_inv_m if s_inv_m > 0 else None


def describe(path: str, clip: int = 0, binning: int = 0, format: str = "auto") -> dict:
    """Everything ``info`` reports, as a JSON-ready dict.

    Raises
    ------
    DatasetError
        Whatever :func:`spinifel.io.dataset.read_geometry` finds wrong.
    ConfigError
        Negative ``clip`` or ``binning``.
    """
    info = inspect_dataset(path, format)
    raw = read_geometry(path, format=format)
    geom = raw if (clip, binning) == (0, 0) else read_geometry(path, clip, binning, format)
    with h5py.File(path, "r") as f:
        if info.format == "cxi":
            # CXI keeps its datasets in groups: list them all by path (links followed).
            datasets = {}

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and not name.startswith("ground_truth/"):
                    datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

            f.visititems(visit)
        else:
            datasets = {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                for k, v in f.items()
                if isinstance(v, h5py.Dataset)
            }
    edge_s, corner_s = edge_and_corner_s(geom)
    extra = {}
    if info.format == "cxi":
        from spinifel.io.cxi import describe_geometry

        extra["cxi"] = describe_geometry(path)
    return {
        "path": info.path,
        "format": info.format,
        "images_dataset": info.images_dataset,
        "n_images": info.n_images,
        "datasets": datasets,
        "intensity_dtype": info.intensity_dtype,
        "position_layout": info.position_layout,
        "detector_shape": list(info.panel_shape),
        "clip": clip,
        "binning": binning,
        "detector_shape_after": list(geom.shape),
        "n_pixels": raw.n_pixels,
        "n_pixels_after": geom.n_pixels,
        "n_masked": int((~raw.mask).sum()),
        "n_masked_after": int((~geom.mask).sum()),
        "reciprocal_extent_inv_m": geom.reciprocal_extent,
        "reciprocal_extent_inv_angstrom": geom.reciprocal_extent / ANGSTROM_PER_METRE,
        "edge_resolution_angstrom": _resolution_angstrom(edge_s),
        "corner_resolution_angstrom": _resolution_angstrom(corner_s),
        "has_mask": info.has_mask,
        "has_orientations": info.has_orientations,
        "has_ground_truth": info.has_ground_truth,
        "attrs": _plain(info.attrs),
        **extra,
    }


def _plain(obj):
    """Attributes as strict JSON (non-finite floats -> None)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _fmt_res(v: float | None) -> str:
    return "n/a (|s| = 0)" if v is None else f"{v:.3g} A"


def format_text(d: dict) -> str:
    """The human-readable report of :func:`describe`'s dict."""
    lines = [f"dataset              {d['path']} ({d.get('format', 'skopi')} format)"]
    for name, meta in d["datasets"].items():
        lines.append(f"  {name:<30} {tuple(meta['shape'])} {meta['dtype']}")
    layouts = {"last": "(n_panels, H, W, 3)", "first": "(3, n_panels, H, W)",
               "cxi": "computed from the CXI detector geometry"}
    lines += [
        f"images               {d['n_images']} ({d['intensity_dtype']})",
        f"position layout      {d['position_layout']}: {layouts[d['position_layout']]}",
        f"detector             {tuple(d['detector_shape'])}: {d['n_pixels']} pixels, "
        f"{d['n_masked']} masked",
        f"detector used        {tuple(d['detector_shape_after'])}: {d['n_pixels_after']} pixels, "
        f"{d['n_masked_after']} masked (clip={d['clip']}, binning={d['binning']})",
        f"reciprocal extent    {d['reciprocal_extent_inv_m']:.6g} 1/m "
        f"({d['reciprocal_extent_inv_angstrom']:.6g} 1/A)",
        f"resolution           edge {_fmt_res(d['edge_resolution_angstrom'])}, "
        f"corner {_fmt_res(d['corner_resolution_angstrom'])}",
        f"mask                 {'present' if d['has_mask'] else 'absent (all pixels good)'}",
        f"orientations         {'present' if d['has_orientations'] else 'absent'}",
        f"ground truth         {'present' if d['has_ground_truth'] else 'absent'}",
    ]
    if "cxi" in d:
        c = d["cxi"]
        lines.append(f"wavelength           {c['wavelength_m']:.6g} m "
                     f"({c['photon_energy_ev']:.6g} eV, from {c['wavelength_source']})")
        where = "centred on the beam at distance" if c["centred_on_beam"] else "corner_position"
        for m, (corner, basis) in enumerate(zip(c["corner_position_m"], c["basis_vectors_m"])):
            lines.append(f"module {m:<13} corner {_vec(corner)} m ({where}), "
                         f"row step {_vec(basis[0])} m, column step {_vec(basis[1])} m")
        lines.append(f"mask bits            {c['no_weight_bits']} set = no weight")
    return "\n".join(lines)


def _vec(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``info``: ``dataset``, ``--clip``, ``--binning``, ``--json``."""
    parser.add_argument("dataset", help="HDF5 dataset in the SpiniFEL/skopi layout or CXI")
    parser.add_argument("--format", choices=("auto", "skopi", "cxi"), default="auto",
                        help="dataset layout (default auto: CXI when the file has cxi_version "
                             "or entry_1)")
    parser.add_argument("--clip", type=int, default=0,
                        help="pixels removed from each panel edge before binning (default 0)")
    parser.add_argument("--binning", type=int, default=0,
                        help="number of 2x2 binning passes (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    """Print the dataset description; returns 0. Dataset errors propagate (CLI: exit 2)."""
    d = describe(args.dataset, clip=args.clip, binning=args.binning, format=args.format)
    if args.json:
        print(json.dumps(d, indent=2, allow_nan=False))
    else:
        print(format_text(d))
    return 0
