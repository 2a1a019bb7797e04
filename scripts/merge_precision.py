"""Merge precision (issue 15): one merge at the true orientations of a dataset at several
NUFFT eps (algorithm.nufft_eps_merge), its NUFFT time, the relative distance of the solution
to the eps = 1e-9 one and its correlation with the true autocorrelation on the support.

    python scripts/merge_precision.py DATA.h5 N_IMAGES OUT.json

Serial (one rank). Writes the JSON with the command and the commit.
"""
import json
import subprocess
import sys
import time

import h5py
import numpy as np

from spinifel.config import load_config
from spinifel.evaluate.report import load_ground_truth
from spinifel.merging.merge import accumulate_normal_equations, merge
from spinifel.parallel.context import ParallelContext, SerialComm
from spinifel.phasing.algorithms import autocorrelation_from_density
from spinifel.pipeline import Problem

path, n = sys.argv[1], int(sys.argv[2])
cfg = load_config(None, [f"data.path={path}", "algorithm.M=51", f"data.n_images={n}",
                         "runtime.precision=double"])
p = Problem.open(cfg, ParallelContext.serial()).load()

with h5py.File(path) as f:
    q = f["orientations"][:n]
truth = load_ground_truth(path, 51, p.extent)
ac_true = autocorrelation_from_density(truth.density.astype(np.float64))
z = np.zeros((51,) * 3)
out = {}
ref = None
for eps in (1e-9, 1e-6, 1e-5, 1e-4, 1e-3):
    t = time.perf_counter()
    eq = accumulate_normal_equations(SerialComm(), p.images, q, p.positions, p.extent, 51, None, eps)
    t_nufft = time.perf_counter() - t
    res = merge(SerialComm(), eq, lambdas_rel=[0.1], x0=z, x_init=z, support=p.support,
                max_iter=300, tol=1e-5)
    x = res.autocorrelation
    if ref is None:
        ref = x
    m = p.support
    cc = float(np.corrcoef(x[m], ac_true[m])[0, 1])
    out[f"{eps:g}"] = {"nufft_seconds": t_nufft, "rel_diff_to_1e-9": float(np.linalg.norm(x - ref) / np.linalg.norm(ref)),
                       "ac_correlation_with_truth": cc}
    print(eps, out[f"{eps:g}"], flush=True)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=__file__.rsplit("/", 2)[0]).stdout.strip()
json.dump({"command": "python " + " ".join(sys.argv), "commit": commit, "dataset": path,
           "n_images": n, "M": 51, "lambda_rel": 0.1, "results": out},
          open(sys.argv[3], "w"), indent=1)
