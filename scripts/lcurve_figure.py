#!/usr/bin/env python3
"""The figure of docs/algorithm.md: L-curves of a run, and lambda choices at the true orientations.

Usage::

    python scripts/lcurve_figure.py DATASET.h5 METRICS.json OUT.png [--lambdas ...]

``DATASET.h5``: a simulated skopi-layout file with ``orientations`` and
``ground_truth/density`` (e.g. the demo's ``demo_data.h5``). ``METRICS.json``: a run's
``metrics.json`` (its ``lcurve`` entries are drawn, one curve per generation). Right panel:
the dataset merged at its true orientations for every lambda (multi-shift CG on all images
and on each seeded half): correlation of the merged autocorrelation with the true one, the
L-curve corner and the two-fold held-out misfit. Prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import h5py
import numpy as np


def sweep_at_true_orientations(path: str, lambdas: list[float], seed: int = 0) -> dict:
    """Correlation with the truth, L-curve corner and held-out misfit per lambda."""
    from spinifel.merging.lcurve import lcurve_corner
    from spinifel.merging.merge import (
        accumulate_normal_equations,
        add_normal_equations,
        ball_support,
        solve_sweep,
    )
    from spinifel.merging.operator import ToeplitzNormalOperator
    from spinifel.parallel.context import SerialComm
    from spinifel.phasing.algorithms import autocorrelation_from_density
    from spinifel.validation.halves import half_assignment

    with h5py.File(path, "r") as f:
        n = f["intensities"].shape[0]
        img = f["intensities"][()].reshape(n, -1).astype(np.float64)
        pos = f["pixel_position_reciprocal"][()].reshape(-1, 3).T.copy()
        q = f["orientations"][()]
        rho = f["ground_truth/density"][()]
    m = rho.shape[0]
    extent = float(np.linalg.norm(pos, axis=0).max())
    sup = ball_support(m)
    truth = autocorrelation_from_density(rho)
    half = half_assignment(n, seed)
    eqs = [accumulate_normal_equations(SerialComm(), img[half == h], q[half == h], pos, extent,
                                       m, eps=1e-9) for h in (0, 1)]
    eq = add_normal_equations(*eqs)
    z = np.zeros((m, m, m))

    def run(e):
        op = ToeplitzNormalOperator(e.spectrum, sup)
        return solve_sweep(op, e, [v * e.weight_sum for v in lambdas], z, 2000, 1e-6)

    full = run(eq)
    held = np.zeros(len(lambdas))
    for a, b in ((0, 1), (1, 0)):
        op_b = ToeplitzNormalOperator(eqs[b].spectrum, sup)
        held += [float(np.vdot(x, op_b(x) - 2 * eqs[b].rhs)) for x in run(eqs[a]).xs]
    cc = [float(np.corrcoef(x[sup], truth[sup])[0, 1]) for x in full.xs]
    corner = lcurve_corner(np.array(full.residual_norms), np.array(full.solution_norms),
                           np.array(lambdas))
    return {"lambdas_rel": lambdas, "correlation": cc, "heldout_misfit": held.tolist(),
            "lcurve_corner": int(corner), "heldout_choice": int(np.argmin(held)),
            "cg_iterations": full.n_iter}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("metrics")
    p.add_argument("out")
    p.add_argument("--lambdas", type=float, nargs="+",
                   default=[1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0])
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = sweep_at_true_orientations(args.dataset, args.lambdas)
    print(json.dumps(res))
    with open(args.metrics, encoding="utf-8") as f:
        gens = json.load(f)["generations"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for e in gens:
        lc = e["lcurve"]
        r, s = np.array(lc["residual_norms"]), np.array(lc["solution_norms"])
        k = int(np.argmin(np.abs(np.array(lc["lambdas_rel"]) - e["lambda_rel"])))
        ax[0].loglog(r / r[0], s, "o-", ms=3, label=f"generation {e['generation'] + 1}")
        ax[0].loglog(r[k] / r[0], s[k], "kx", ms=9)
    ax[0].set_xlabel("residual norm / residual at the smallest lambda")
    ax[0].set_ylabel("solution norm ||x - x0||")
    ax[0].set_title("L-curves of the run (x = chosen lambda)", fontsize=9)
    ax[0].legend(fontsize=8)
    lam = np.array(res["lambdas_rel"])
    held = np.array(res["heldout_misfit"])
    ax[1].semilogx(lam, res["correlation"], "o-", label="correlation with the true autocorrelation")
    ax[1].set_xlabel("lambda_rel")
    ax[1].set_ylabel("correlation")
    ax2 = ax[1].twinx()
    ax2.semilogx(lam, (held - held.min()) / abs(held.min()), "s--", color="tab:red",
                 label="held-out misfit (relative excess over its minimum)")
    ax2.set_yscale("symlog", linthresh=1e-6)
    ax2.set_ylabel("held-out misfit excess", color="tab:red")
    ax[1].axvline(lam[res["lcurve_corner"]], color="gray", ls=":", label="L-curve corner")
    ax[1].axvline(lam[res["heldout_choice"]], color="tab:red", ls=":", label="held-out minimum")
    ax[1].set_title("the dataset merged at its true orientations", fontsize=9)
    h1, l1 = ax[1].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax[1].legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
