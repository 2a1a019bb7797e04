"""``OUT/progress.png``: a run's state at a glance, redrawn by rank 0 every generation.

Four panels: seconds per stage and generation, the fraction of images that changed
orientation, resolutions (half-set FSC 0.143 and, with ground truth, FSC 0.5 against the
truth), and the latest half-set FSC / final PRTF curves. The file is replaced atomically,
so a viewer that reloads it never sees a half-written picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spinifel.io.output import atomic_write

PROGRESS_NAME = "progress.png"

# Stages drawn as stacked bars, in pipeline order; anything else is summed into "other".
_STAGES = ("slicing", "matching", "refinement", "merge_nufft", "merge_allreduce", "merge_cg",
           "merge_lcurve", "phasing", "half_sets")


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _posterior_curves(ax: Any, g: np.ndarray, gens: list[dict]) -> None:
    """Poisson score: the information rate (nats) and log10 beta on a second axis of ``ax``."""
    info = np.array([_num((e.get("posterior") or {}).get("mutual_information")) for e in gens])
    if not np.isfinite(info).any():
        return
    beta = np.array([_num((e.get("posterior") or {}).get("beta")) for e in gens])
    twin = ax.twinx()
    twin.plot(g, info, "s-", ms=3, color="tab:green", label="information rate (nats)")
    twin.plot(g, np.log10(beta), "^:", ms=3, color="tab:purple", label="log10 beta")
    twin.set_ylabel("posterior")
    twin.legend(fontsize=7, loc="upper right")
    ax.set_title("orientation changes; posterior information and beta")


def write_progress(out_dir: str | Path, doc: dict) -> Path:
    """Draw ``doc`` (the content of ``metrics.json``) into ``OUT/progress.png`` atomically.

    Parameters
    ----------
    out_dir : path
        Output directory (exists).
    doc : dict
        ``{"generations": [entry, ...], "prtf": {...} optional, ...}`` as the pipeline
        writes it; missing pieces (no half sets, no truth) leave their panel empty with a
        note.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = doc.get("generations", [])
    g = np.array([e["generation"] + 1 for e in gens])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    ax = axes[0, 0]
    bottom = np.zeros(len(gens))
    for stage in _STAGES + ("other",):
        if stage == "other":
            vals = np.array([sum(v for k, v in e["timings"].items()
                                 if k not in _STAGES and v) for e in gens])
        else:
            vals = np.array([e["timings"].get(stage, 0.0) or 0.0 for e in gens])
        if vals.size and vals.any():
            ax.bar(g, vals, bottom=bottom, label=stage)
            bottom += vals
    ax.set_xlabel("generation")
    ax.set_ylabel("seconds")
    ax.set_title("time per stage")
    if bottom.any():
        ax.legend(fontsize=7, ncol=2)

    ax = axes[0, 1]
    ch = np.array([_num(e.get("orientation_change")) for e in gens])
    ax.plot(g, ch, "o-", ms=3)
    ax.set_xlabel("generation")
    ax.set_ylabel("fraction of images")
    ax.set_title("orientation changes between generations")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _posterior_curves(ax, g, gens)

    ax = axes[1, 0]
    hs = np.array([_num((e.get("half_set") or {}).get("resolution_0p143_angstrom")) for e in gens])
    ev = np.array([_num((e.get("evaluation") or {}).get("fsc_resolution_0p5_angstrom"))
                   for e in gens])
    drawn = False
    if np.isfinite(hs).any():
        ax.plot(g, hs, "o-", ms=3, label="half-set FSC 0.143")
        drawn = True
    if np.isfinite(ev).any():
        ax.plot(g, ev, "s--", ms=3, label="FSC 0.5 vs ground truth")
        drawn = True
    prtf = doc.get("prtf")
    if prtf and prtf.get("resolution_1_over_e_angstrom"):
        ax.axhline(prtf["resolution_1_over_e_angstrom"], color="tab:red", ls=":",
                   label="final PRTF (above its random-phase floor)")
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.invert_yaxis()  # better resolution (smaller angstrom) upwards
    else:
        ax.text(0.5, 0.5, "no half sets or ground truth\n(validation.half_sets = false)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("generation")
    ax.set_ylabel("resolution (angstrom)")
    ax.set_title("resolution")
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    drawn = False
    last_hs = next((e["half_set"] for e in reversed(gens) if e.get("half_set")), None)
    if last_hs:
        ax.plot(last_hs["freq_inv_angstrom"], [_num(v) for v in last_hs["fsc"]], "o-", ms=3,
                label="half-set FSC (latest)")
        ax.axhline(0.143, color="tab:orange", lw=0.8, ls=":", label="0.143")
        drawn = True
    if prtf:
        ax.plot(prtf["freq_inv_angstrom"], [_num(v) for v in prtf["prtf"]], "s-", ms=3,
                label=f"PRTF ({prtf['n_runs']} runs)")
        ax.axhline(np.exp(-1.0), color="tab:red", lw=0.8, ls=":", label="1/e")
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.set_ylim(-0.1, 1.05)
    else:
        ax.text(0.5, 0.5, "no half-set FSC or PRTF yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("spatial frequency (1/angstrom)")
    ax.set_title("shell curves")
    ax.grid(alpha=0.3)
    n_total = doc.get("n_generations")
    fig.suptitle(f"spinifel-mpi: generation {g[-1] if g.size else 0}"
                 + (f" of {n_total}" if n_total else "")
                 + f", {doc.get('n_images', '?')} images on {doc.get('n_ranks', '?')} ranks")

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=90)

    try:
        return atomic_write(Path(out_dir) / PROGRESS_NAME, write)
    finally:
        plt.close(fig)
