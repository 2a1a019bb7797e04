#!/usr/bin/env python
"""Run the peer EMC program Dragonfly on a spinifel-mpi simulated dataset and score it.

Dragonfly (GitHub ``duaneloh/Dragonfly``, GPL-3.0) is an external C program; this script
only writes its documented input formats, launches it, and reads its outputs. No Dragonfly
code is used or copied. See ``/work/shared/docs/peers.md`` (or docs/data/peers/README.md).

Subcommands
-----------
``export DATA.h5 OUTDIR [--frames N] [--iters N]``
    Writes ``OUTDIR/det.h5`` (detector: ``qx, qy, qz`` in Dragonfly voxel units,
    ``corr``, ``mask``, ``detd``, ``ewald_rad``; float64), ``OUTDIR/photons.h5`` (sparse
    photons: ``num_pix``, ``place_ones``, ``place_multi``, ``count_multi`` as vlen int32),
    ``OUTDIR/config.ini`` (``[emc]`` with ``num_div = 6``, ``need_scaling = 1`` and a beta
    schedule that doubles beta so that it reaches 1 at about three quarters of the run),
    ``OUTDIR/quat.dat`` (the orientation grid, written by Dragonfly's ``make_quaternion``)
    and ``OUTDIR/export.json``.
``run OUTDIR [--threads T]``
    Launches ``nice -n 19 mpirun -np 1 emc -c config.ini -t T NITER`` in OUTDIR and
    measures its wall time; writes ``OUTDIR/run_info.json``.
``evaluate DATA.h5 OUTDIR [--json PATH]``
    Reads the last ``OUTDIR/output/output_NNN.h5``, fits the one global rotation, and
    writes per-frame orientation error statistics, the grid sampling floor, the 3D
    intensity correlation against the ground truth and the run facts to a JSON file.

Conventions
-----------
spinifel: image ``i`` samples ``I_true(R(q_i) s)`` with ``R`` the active matrix of
``[w, x, y, z]`` and ``s`` the reciprocal pixel position in 1/m (``|s| = 2 sin(theta) /
lambda``). Dragonfly samples its model at ``R_d q`` with ``R_d = R(q_d)^T`` and ``q`` the
pixel position in voxel units ``q = s * lambda * ewald_rad``, ``ewald_rad = detd / pixel
size``. Hence ``R(q_true) = G R(conj(q_d))``, i.e. ``q_true = g (x) conj(q_d)`` for one
global rotation ``g`` (matrix ``G``), and ``I_dragonfly(x) = I_true(G x)`` (voxel units).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import itertools
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from typing import Any

import h5py
import numpy as np
from scipy import ndimage

DRAGONFLY_DIR = os.environ.get("DRAGONFLY_DIR", "/work/dragonfly")
EMC_BIN = os.path.join(DRAGONFLY_DIR, "build", "emc")
QUAT_BIN = os.path.join(DRAGONFLY_DIR, "build", "utils", "make_quaternion")
NUM_DIV = 6
DEFAULT_ITERS = 24
BETA_TARGET_FRACTION = 0.75


# --------------------------------------------------------------------------- quaternions
def qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a (x) b`` of ``[w, x, y, z]`` quaternions, broadcasting ``(..., 4)``."""
    aw, ax, ay, az = np.moveaxis(np.asarray(a, dtype=np.float64), -1, 0)
    bw, bx, by, bz = np.moveaxis(np.asarray(b, dtype=np.float64), -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz,
                     aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw], axis=-1)


def qconj(q: np.ndarray) -> np.ndarray:
    """Conjugate ``[w, -x, -y, -z]`` of quaternions ``(..., 4)``."""
    out = np.array(q, dtype=np.float64, copy=True)
    out[..., 1:] *= -1
    return out


def qangle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angle in degrees, in [0, 180], between unit quaternions ``a`` and ``b``."""
    d = np.abs(np.sum(a * b, axis=-1))
    return np.degrees(2.0 * np.arccos(np.clip(d, 0.0, 1.0)))


def qmatrix(q: np.ndarray) -> np.ndarray:
    """Active rotation matrix ``(3, 3)`` of one unit quaternion ``[w, x, y, z]``."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def quat_mean(q: np.ndarray) -> np.ndarray:
    """Chordal L2 mean of unit quaternions ``(N, 4)``: top eigenvector of ``sum q q^T``."""
    _, vecs = np.linalg.eigh(q.T @ q)
    return vecs[:, -1]


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly distributed unit quaternions (normalised 4D Gaussians), ``(n, 4)``."""
    q = rng.standard_normal((n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def nearest_angle_deg(q: np.ndarray, grid: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Angle in degrees from each quaternion ``(n, 4)`` to its nearest grid quaternion."""
    out = np.empty(q.shape[0])
    for i in range(0, q.shape[0], chunk):
        d = np.abs(q[i:i + chunk] @ grid.T).max(axis=1)
        out[i:i + chunk] = np.degrees(2.0 * np.arccos(np.clip(d, 0.0, 1.0)))
    return out


def read_quat_file(path: str) -> np.ndarray:
    """Quaternions ``(n, 4)`` ``[w, x, y, z]`` of a Dragonfly ASCII quaternion file.

    The file is ``n`` on the first line, then ``n`` rows ``w x y z weight``.
    """
    with open(path) as fh:
        n = int(fh.readline())
        rows = np.loadtxt(fh, dtype=np.float64, ndmin=2)
    if rows.shape != (n, 5):
        raise ValueError(f"{path}: expected {n} rows of 5 numbers, got shape {rows.shape}")
    return rows[:, :4]


# --------------------------------------------------------------------------- export
def _read_geometry(f: h5py.File) -> dict[str, Any]:
    """Pixel positions ``(P, 3)`` 1/m, mask ``(P,)`` bool (True = good), wavelength m, etc."""
    s = np.asarray(f["pixel_position_reciprocal"], dtype=np.float64).reshape(-1, 3)
    good = np.asarray(f["mask"]).reshape(-1) == 1
    return {"s": s, "good": good, "wavelength_m": float(f.attrs["wavelength_m"]),
            "det_distance_m": float(f.attrs["det_distance"]),
            "pixel_size_m": float(f.attrs["pixel_size"])}


def write_detector(path: str, geo: dict[str, Any], orient_qmax: float | None = None
                   ) -> dict[str, float]:
    """Write Dragonfly's HDF5 detector file; returns ``ewald_rad`` and the largest ``|q|``.

    ``q_vox = s * lambda * ewald_rad`` per component (same axes and sign as spinifel's
    ``s``), ``corr = 1`` (the simulator has no solid-angle or polarisation factor),
    ``mask`` 0 for good pixels and 2 (unused) for the beamstop, ``detd`` in pixels. With
    ``orient_qmax`` (voxels), good pixels with ``|q| > orient_qmax`` get mask 1 (merged
    but not used to find orientations), as Dragonfly's own ``make_detector`` does for
    pixels outside the inscribed circle.
    """
    ewald_rad = geo["det_distance_m"] / geo["pixel_size_m"]
    q = geo["s"] * geo["wavelength_m"] * ewald_rad
    mask = np.where(geo["good"], 0, 2).astype(np.uint8)
    if orient_qmax is not None:
        mask[geo["good"] & (np.linalg.norm(q, axis=1) > orient_qmax)] = 1
    with h5py.File(path, "w") as h:
        for i, name in enumerate(("qx", "qy", "qz")):
            h.create_dataset(name, data=np.ascontiguousarray(q[:, i], dtype=np.float64))
        h.create_dataset("corr", data=np.ones(q.shape[0], dtype=np.float64))
        h.create_dataset("mask", data=mask)
        h.create_dataset("detd", data=np.float64(ewald_rad))
        h.create_dataset("ewald_rad", data=np.float64(ewald_rad))
    qn = np.linalg.norm(q[geo["good"]], axis=1)
    return {"ewald_rad": ewald_rad, "q_max_vox": float(qn.max()), "q_min_vox": float(qn.min()),
            "orient_qmax_vox": orient_qmax, "n_mask0": int((mask == 0).sum()),
            "n_mask1": int((mask == 1).sum()), "n_mask2": int((mask == 2).sum())}


def write_photons(path: str, frames: np.ndarray, good: np.ndarray) -> dict[str, float]:
    """Write the sparse photon file from dense counts ``(N, P)``; beamstop pixels dropped.

    Returns the number of frames and the mean and median photons per frame written.
    """
    counts = np.rint(frames).astype(np.int64)
    if np.abs(frames - counts).max() > 1e-3 or counts.min() < 0:
        raise ValueError("intensities are not non-negative integer photon counts")
    counts[:, ~good] = 0
    vlen = h5py.vlen_dtype(np.int32)
    n = counts.shape[0]
    with h5py.File(path, "w") as h:
        h.create_dataset("num_pix", data=np.array([counts.shape[1]], dtype=np.int32))
        ones = h.create_dataset("place_ones", (n,), dtype=vlen)
        pm = h.create_dataset("place_multi", (n,), dtype=vlen)
        cm = h.create_dataset("count_multi", (n,), dtype=vlen)
        for i in range(n):
            c = counts[i]
            ones[i] = np.flatnonzero(c == 1).astype(np.int32)
            idx = np.flatnonzero(c > 1).astype(np.int32)
            pm[i] = idx
            cm[i] = c[idx].astype(np.int32)
    tot = counts.sum(axis=1)
    return {"n_frames": int(n), "mean_photons": float(tot.mean()),
            "median_photons": float(np.median(tot))}


def beta_schedule(median_photons: float, n_iter: int) -> dict[str, Any]:
    """Doubling period so that beta of the median frame reaches 1 near 3/4 of the run.

    With ``need_scaling = 1`` and ``beta`` left at ``auto``, Dragonfly starts each frame at
    ``beta0 = exp(-6.5 (K 1e-5)^0.15)`` for ``K`` photons (Dragonfly ``calc_beta``), and
    multiplies it by ``jump`` every ``period`` iterations (``(iteration-1) // period``
    jumps), capped at 1. With ``jump = 2`` beta reaches 1 after ``ceil(log2(1/beta0))``
    jumps, at iteration ``1 + period * jumps``; the period closest to the target is kept.
    """
    beta0 = math.exp(-6.5 * (median_photons * 1e-5) ** 0.15)
    jumps = max(1, math.ceil(math.log2(1.0 / beta0)))
    target = BETA_TARGET_FRACTION * n_iter
    period = min(range(1, n_iter + 1), key=lambda p: abs(1 + p * jumps - target))
    return {"beta0_median_frame": beta0, "jump": 2.0, "period": period,
            "iteration_beta_reaches_1": 1 + period * jumps, "target_iteration": target}


def write_config(outdir: str, n_iter: int, sched: dict[str, Any]) -> None:
    """Write ``config.ini`` (``[emc]`` for emc, ``[make_quaternion]`` for the grid)."""
    text = f"""# Written by spinifel-mpi scripts/peer_dragonfly.py export
# Run: mpirun -np 1 emc -c config.ini -t THREADS {n_iter}
[make_quaternion]
num_div = {NUM_DIV}
out_quat_file = quat.dat

[emc]
in_photons_file = photons.h5
in_detector_file = det.h5
num_div = {NUM_DIV}
output_folder = output/
log_file = EMC.log
need_scaling = 1
beta_schedule = {sched['jump']:.1f} {sched['period']}
"""
    with open(os.path.join(outdir, "config.ini"), "w") as fh:
        fh.write(text)


def cmd_export(args: argparse.Namespace) -> int:
    """Write detector, photons, config and quaternion grid for one dataset."""
    os.makedirs(os.path.join(args.outdir, "output"), exist_ok=True)
    with h5py.File(args.data, "r") as f:
        geo = _read_geometry(f)
        n_all = f["intensities"].shape[0]
        n = n_all if args.frames is None else min(args.frames, n_all)
        frames = np.asarray(f["intensities"][:n], dtype=np.float64).reshape(n, -1)
    det = write_detector(os.path.join(args.outdir, "det.h5"), geo, args.orient_qmax)
    pho = write_photons(os.path.join(args.outdir, "photons.h5"), frames, geo["good"])
    sched = beta_schedule(pho["median_photons"], args.iters)
    write_config(args.outdir, args.iters, sched)
    subprocess.run([QUAT_BIN, "config.ini"], cwd=args.outdir, check=True)
    n_quat = read_quat_file(os.path.join(args.outdir, "quat.dat")).shape[0]
    info = {"data_file": os.path.abspath(args.data), "n_frames_in_file": int(n_all),
            "frames_used": f"first {n}", "n_iter": args.iters, "num_div": NUM_DIV,
            "n_orientations": n_quat, "detector": det, "photons": pho, "beta": sched,
            "n_good_pixels": int(geo["good"].sum())}
    with open(os.path.join(args.outdir, "export.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    print(json.dumps(info, indent=2))
    return 0


# --------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    """Launch emc under ``nice`` with a fixed thread count and time it."""
    with open(os.path.join(args.outdir, "export.json")) as fh:
        n_iter = json.load(fh)["n_iter"]
    cmd = ["nice", "-n", str(args.nice), "mpirun", "--allow-run-as-root", "-np", "1",
           "-x", f"OMP_NUM_THREADS={args.threads}", EMC_BIN, "-c", "config.ini",
           "-t", str(args.threads), str(n_iter)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()
    start = dt.datetime.now(dt.timezone.utc)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(os.path.join(args.outdir, "emc_stderr.log"), "w") as err:
        proc = subprocess.run(cmd, check=False, cwd=args.outdir, env=env, stdout=err,
                              stderr=err)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    info = {"command": shlex.join(cmd), "cwd": os.path.abspath(args.outdir),
            "threads": args.threads, "n_iter": n_iter, "returncode": proc.returncode,
            "wall_s": wall, "cpu_s": cpu,
            "cpu_s_how": "getrusage(RUSAGE_CHILDREN): user+sys of nice/mpirun/emc",
            "start_utc": start.isoformat(timespec="seconds"),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "nproc": os.cpu_count()}
    with open(os.path.join(args.outdir, "run_info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    print(json.dumps(info, indent=2))
    return proc.returncode


# --------------------------------------------------------------------------- evaluate
def fit_global_rotation(q_true: np.ndarray, q_rec: np.ndarray, n_cand: int = 512,
                        seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Robust ``g`` with ``q_true ~= g (x) q_rec`` (all ``(N, 4)`` unit quaternions).

    Every frame ``i`` proposes ``g_i = q_true_i (x) conj(q_rec_i)``; of ``n_cand`` frames
    (random, without replacement) the proposal with the smallest median error over all
    frames is kept, then refined by the chordal mean of the proposals of frames within
    3x the median error (repeated while the median decreases).
    """
    rng = np.random.default_rng(seed)
    n = q_true.shape[0]
    props = qmul(q_true, qconj(q_rec))

    def med(g: np.ndarray) -> float:
        return float(np.median(qangle_deg(q_true, qmul(g, q_rec))))

    picks = rng.choice(n, size=min(n, n_cand), replace=False)
    meds = np.array([med(props[i]) for i in picks])
    g = props[picks[int(np.argmin(meds))]]
    best = med(g)
    seed_median = best
    for _ in range(20):
        err = qangle_deg(q_true, qmul(g, q_rec))
        inl = err <= max(3.0 * np.median(err), 1e-3)
        cand = quat_mean(props[inl])
        m = med(cand)
        if m >= best - 1e-9:
            break
        g, best = cand, m
    g = g if g[0] >= 0 else -g
    return g, {"n_candidates": int(picks.size), "seed_median_deg": seed_median,
               "refined_median_deg": best}


def _last_output(outdir: str) -> str:
    files = sorted(glob.glob(os.path.join(outdir, "output", "output_[0-9][0-9][0-9].h5")))
    files = [p for p in files if not p.endswith("output_000.h5")]
    if not files:
        raise FileNotFoundError(f"no output/output_NNN.h5 (NNN > 0) under {outdir}")
    return files[-1]


def intensity_cc(model: np.ndarray, weight: np.ndarray, f: h5py.File, g: np.ndarray,
                 exp_info: dict[str, Any], wavelength_m: float) -> dict[str, Any]:
    """Pearson CC of Dragonfly's 3D intensity, resampled onto the truth grid, vs the truth.

    Truth voxel ``l`` is at ``k = (l - (M-1)/2) * 2 ext / M`` (1/m) per axis
    (spinifel.simulate.truth); in Dragonfly voxels ``k * lambda * ewald_rad``, and the
    Dragonfly model is read at ``G^T k`` (trilinear) around its centre ``size // 2``.
    Voxels used: Dragonfly's merge weight (resampled) > 0 and ``q_min <= |k| <= q_max`` of
    the good detector pixels. Also reported per shell (5 shells equal in radius).
    """
    truth = np.asarray(f["ground_truth/intensity"], dtype=np.float64)
    m = truth.shape[0]
    ext = float(f["ground_truth"].attrs["reciprocal_extent"])
    scale = (2.0 * ext / m) * wavelength_m * exp_info["detector"]["ewald_rad"]
    ax = (np.arange(m) - (m - 1) / 2.0) * scale
    k = np.stack(np.meshgrid(ax, ax, ax, indexing="ij")).reshape(3, -1)
    src = qmatrix(g).T @ k + model.shape[0] // 2
    vals = ndimage.map_coordinates(model, src, order=1, mode="constant", cval=0.0)
    wts = ndimage.map_coordinates(weight, src, order=1, mode="constant", cval=0.0)
    kn = np.linalg.norm(k, axis=0)
    qmin, qmax = exp_info["detector"]["q_min_vox"], exp_info["detector"]["q_max_vox"]
    use = (wts > 0) & (kn >= qmin) & (kn <= qmax)
    t = truth.reshape(-1)

    def cc(sel: np.ndarray) -> float:
        return float(np.corrcoef(vals[sel], t[sel])[0, 1])

    edges = np.linspace(qmin, min(qmax, kn.max()), 6)
    shells = [{"q_vox_range": [float(a), float(b)], "n_voxels": int((sel := use & (kn >= a)
              & (kn < b)).sum()), "cc": cc(sel) if sel.sum() > 2 else None}
              for a, b in itertools.pairwise(edges)]
    return {"cc": cc(use), "n_voxels": int(use.sum()), "truth_grid": m,
            "dragonfly_grid": int(model.shape[0]), "interpolation": "trilinear",
            "shells": shells}


def read_emc_log(outdir: str) -> list[dict[str, float]]:
    """Per-iteration rows of Dragonfly's ``EMC.log`` (time s, rms_change, info_rate,
    log-likelihood, num_rot, mean beta); empty when the log is absent."""
    path = os.path.join(outdir, "EMC.log")
    if not os.path.exists(path):
        return []
    keys = ("iteration", "time_s", "rms_change", "info_rate", "log_likelihood", "num_rot",
            "beta_mean")
    rows = []
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == len(keys) and parts[0].isdigit():
                rows.append({k: (int(v) if k in ("iteration", "num_rot") else float(v))
                             for k, v in zip(keys, parts)})
    return rows


def error_by_iteration(outdir: str, q_true_all: np.ndarray, grid: np.ndarray
                       ) -> list[dict[str, float]]:
    """Median and p90 orientation error (deg) of every ``output_NNN.h5``, g refitted each."""
    rows = []
    for path in sorted(glob.glob(os.path.join(outdir, "output", "output_[0-9][0-9][0-9].h5"))):
        with h5py.File(path, "r") as h:
            if "orientations" not in h:
                continue
            idx = np.asarray(h["orientations"], dtype=np.int64)
        qt, c = q_true_all[:idx.size], qconj(grid[idx])
        g, _ = fit_global_rotation(qt, c, n_cand=128)
        e = qangle_deg(qt, qmul(g, c))
        rows.append({"iteration": int(os.path.basename(path)[7:10]),
                     "median": float(np.median(e)), "p90": float(np.percentile(e, 90))})
    return rows


def self_consistency(model: np.ndarray, det_path: str, counts: np.ndarray, q_true: np.ndarray,
                     q_d: np.ndarray, g: np.ndarray) -> dict[str, Any]:
    """Poisson log-likelihood of frames under Dragonfly's own model: its pick vs the truth.

    For each frame (dense counts ``(n, P)``), slice the model (trilinear, our code) at
    Dragonfly's chosen orientation ``R(q_d)^T`` and at the true orientation mapped into its
    frame ``G^T R(q_true)``, each slice scaled to the frame's photon total. A positive
    difference for most frames means Dragonfly's picks are self-consistent with its model
    (inputs read as intended) and the model itself differs from the truth.
    """
    with h5py.File(det_path, "r") as d:
        q = np.stack([np.asarray(d[k], dtype=np.float64) for k in ("qx", "qy", "qz")])
        use = np.asarray(d["mask"]) == 0
    q, k = q[:, use], counts[:, use]
    centre = model.shape[0] // 2
    gt = qmatrix(g).T

    def loglik(kk: np.ndarray, r: np.ndarray) -> float:
        w = ndimage.map_coordinates(model, r @ q + centre, order=1, mode="constant") + 1e-12
        w *= kk.sum() / w.sum()
        return float(kk @ np.log(w) - w.sum())

    diff = np.array([loglik(k[i], qmatrix(q_d[i]).T) - loglik(k[i], gt @ qmatrix(q_true[i]))
                     for i in range(k.shape[0])])
    return {"n_frames": int(diff.size), "median_loglik_pick_minus_truth": float(np.median(diff)),
            "frac_truth_more_likely": float(np.mean(diff < 0))}


def _run_facts(outdir: str) -> dict[str, Any]:
    path = os.path.join(outdir, "run_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score the last Dragonfly iteration against the simulator's truth; write the JSON."""
    with open(os.path.join(args.outdir, "export.json")) as fh:
        exp_info = json.load(fh)
    out_path = _last_output(args.outdir)
    grid = read_quat_file(os.path.join(args.outdir, "quat.dat"))
    with h5py.File(out_path, "r") as h:
        idx = np.asarray(h["orientations"], dtype=np.int64)
        model = np.asarray(h["intens"], dtype=np.float64)
        weight = np.asarray(h["inter_weight"], dtype=np.float64)
        mutual_info = np.asarray(h["mutual_info"], dtype=np.float64)
    model, weight = model.reshape(model.shape[-3:]), weight.reshape(weight.shape[-3:])
    n = idx.size
    q_d = grid[idx]
    with h5py.File(args.data, "r") as f:
        q_true = np.asarray(f["orientations"][:n], dtype=np.float64)
        q_true /= np.linalg.norm(q_true, axis=1, keepdims=True)
        g, fit = fit_global_rotation(q_true, qconj(q_d))
        err = qangle_deg(q_true, qmul(g, qconj(q_d)))
        g_alt, _ = fit_global_rotation(q_true, q_d)
        alt_med = float(np.median(qangle_deg(q_true, qmul(g_alt, q_d))))
        cc = intensity_cc(model, weight, f, g, exp_info, float(f.attrs["wavelength_m"]))
        n_sc = min(100, n)
        counts = np.asarray(f["intensities"][:n_sc], dtype=np.float64).reshape(n_sc, -1)
        q_all = np.asarray(f["orientations"][:n], dtype=np.float64)
    sc = self_consistency(model, os.path.join(args.outdir, "det.h5"), counts, q_true[:n_sc],
                          q_d[:n_sc], g)
    by_iter = error_by_iteration(args.outdir, q_all, grid)
    floor = nearest_angle_deg(random_quaternions(20000, np.random.default_rng(1)), grid)
    result = build_result(args, exp_info, out_path, err, fit, g, alt_med, floor, cc,
                          mutual_info, grid.shape[0])
    result["orientation_error_by_iteration_deg"] = by_iter
    result["self_consistency_first_frames"] = sc
    result["caveats"] += list(args.note or [])
    result["commands"]["evaluate"] += "".join(f" --note {shlex.quote(t)}" for t in args.note or [])
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: result[k] for k in ("orientation_error_deg", "grid_sampling_floor_deg",
                                            "intensity_cc_vs_truth", "run")}, indent=2))
    return 0


def _dragonfly_commit() -> str:
    r = subprocess.run(["git", "-C", DRAGONFLY_DIR, "log", "-1", "--format=%H"],
                       check=False, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def build_result(args: argparse.Namespace, exp_info: dict[str, Any], out_path: str,
                 err: np.ndarray, fit: dict[str, Any], g: np.ndarray, alt_med: float,
                 floor: np.ndarray, cc: dict[str, Any], mutual_info: np.ndarray,
                 n_quat: int) -> dict[str, Any]:
    """Assemble the JSON record (numbers, commands, provenance, caveats)."""
    run = _run_facts(args.outdir)
    log_rows = read_emc_log(args.outdir)
    n_iter = run.get("n_iter", exp_info["n_iter"])
    last_iter = int(os.path.basename(out_path)[7:10])
    wall = run.get("wall_s")
    pairs = float(err.size) * n_quat * n_iter
    caveats = []
    if err.size < exp_info["n_frames_in_file"]:
        caveats.append(f"Only the first {err.size} of the {exp_info['n_frames_in_file']} "
                       "frames were used, to fit the run into the time available on a "
                       "shared 2-core machine (1 thread).")
    if last_iter < n_iter or not run:
        caveats.append(f"The run was stopped before it finished (deadline): scored at "
                       f"iteration {last_iter} of {n_iter}; wall_s is then missing and "
                       "the EMC.log iteration times give the time spent.")
    data_name = os.path.basename(args.data)
    here = os.path.relpath(os.path.abspath(__file__), os.getcwd())
    return {
        "peer": "Dragonfly EMC (C program emc, GitHub duaneloh/Dragonfly, GPL-3.0)",
        "dragonfly_commit": _dragonfly_commit(),
        "data_file": data_name,
        "frames_used": exp_info["frames_used"],
        "n_frames": int(err.size),
        "photons_per_frame_mean": exp_info["photons"]["mean_photons"],
        "n_orientations": n_quat, "num_div": exp_info["num_div"],
        "iterations": n_iter, "iteration_scored": last_iter,
        "beta_schedule": exp_info["beta"], "need_scaling": 1,
        "output_file": os.path.relpath(out_path, args.outdir),
        "orientation_error_deg": {
            "median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
            "mean": float(np.mean(err)),
            "frac_within_10deg": float(np.mean(err <= 10.0)),
            "frac_above_150deg": float(np.mean(err >= 150.0)),
            "convention": "q_true = g (x) conj(q_dragonfly) (Dragonfly rotation matrix is the "
                          "transpose of the active matrix of [w,x,y,z])",
            "global_rotation_g_wxyz": [float(v) for v in g], "fit": fit,
            "median_deg_if_convention_were_q_true_eq_g_x_q_dragonfly": alt_med},
        "grid_sampling_floor_deg": {
            "median": float(np.median(floor)), "p90": float(np.percentile(floor, 90)),
            "how": "angle from 20,000 uniformly random orientations to the nearest of the "
                   f"{n_quat} grid quaternions (quat.dat from make_quaternion, num_div "
                   f"{exp_info['num_div']})"},
        "intensity_cc_vs_truth": cc,
        "mutual_info_mean_last_iter": float(np.mean(mutual_info)),
        "run": {"wall_s": run.get("wall_s"), "cpu_s": run.get("cpu_s"),
                "cpu_s_how": run.get("cpu_s_how"), "threads": run.get("threads"),
                "mpi_ranks": 1, "start_utc": run.get("start_utc"),
                "loadavg_before": run.get("loadavg_before"),
                "loadavg_after": run.get("loadavg_after"), "nproc": run.get("nproc"),
                "returncode": run.get("returncode"),
                "frame_orientation_pairs_per_s": pairs / wall if wall else None,
                "frame_orientation_pairs_per_cpu_s": (pairs / run["cpu_s"]
                                                      if run.get("cpu_s") else None),
                "emc_log_iteration_time_sum_s": sum(r["time_s"] for r in log_rows)},
        "emc_log": log_rows,
        "commands": {
            "export": f"python {here} export {args.data} {args.outdir} --iters "
                      f"{exp_info['n_iter']}" + _frames_flag(exp_info) + _qmax_flag(exp_info),
            "run": f"python {here} run {args.outdir} --threads {run.get('threads')}",
            "emc_as_launched": run.get("command"),
            "evaluate": f"python {here} evaluate {args.data} {args.outdir} --json {args.json}"},
        "caveats": caveats + [
            ("Wall time measured around the whole mpirun/emc process (setup included) with "
             "nice -n 19 on a 2-core machine shared with other workers (see loadavg): it is "
             "an upper bound, not a clean benchmark."),
            ("Orientation error uses Dragonfly's most likely orientation per frame "
             "(output 'orientations'), not its full probability distribution."),
        ],
    }


def _qmax_flag(exp_info: dict[str, Any]) -> str:
    v = exp_info["detector"].get("orient_qmax_vox")
    return "" if v is None else f" --orient-qmax {v}"


def _frames_flag(exp_info: dict[str, Any]) -> str:
    used = exp_info["frames_used"].split()[-1]
    return "" if int(used) == exp_info["n_frames_in_file"] else f" --frames {used}"


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write Dragonfly inputs")
    e.add_argument("data")
    e.add_argument("outdir")
    e.add_argument("--frames", type=int, default=None, help="use the first N frames")
    e.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    e.add_argument("--orient-qmax", type=float, default=None,
                   help="mask 1 (merge only) for pixels with |q| above this (voxels)")
    r = sub.add_parser("run", help="run emc and time it")
    r.add_argument("outdir")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--nice", type=int, default=19)
    v = sub.add_parser("evaluate", help="score the last iteration")
    v.add_argument("data")
    v.add_argument("outdir")
    v.add_argument("--json", default=None)
    v.add_argument("--note", action="append", help="free-text note added to caveats")
    a = p.parse_args(argv)
    if a.cmd == "export":
        return cmd_export(a)
    if a.cmd == "run":
        return cmd_run(a)
    if a.json is None:
        stem = os.path.splitext(os.path.basename(a.data))[0].split("_")[-1]
        a.json = f"peer_dragonfly_{stem}.json"
    return cmd_evaluate(a)


if __name__ == "__main__":
    sys.exit(main())
