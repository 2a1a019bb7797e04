"""PNG plots of an evaluation (matplotlib, Agg backend selected inside each call).

Only rank 0 (or the serial ``evaluate`` command) calls these; importing this module
does not import matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spinifel.evaluate.fsc import describe_resolution


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fsc(path: Path, summary: dict[str, Any]) -> None:
    """FSC of the aligned density (and intensity shell correlation) with 0.5 / 0.143 lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    f = np.array(summary["fsc_curve"]["freq"], dtype=np.float64)
    c = np.array([np.nan if v is None else v for v in summary["fsc_curve"]["fsc"]])
    ax.plot(f, c, "o-", ms=3, label="density FSC")
    isc = summary.get("intensity_shell_correlation")
    if isc:
        ci = np.array([np.nan if v is None else v for v in isc["correlation"]])
        ax.plot(np.array(isc["freq"]), ci, "s--", ms=2, alpha=0.7,
                label="intensity shell correlation")
    for thr, key, col in ((0.5, "fsc_resolution_0p5_angstrom", "tab:orange"),
                          (0.143, "fsc_resolution_0p143_angstrom", "tab:red")):
        res = summary.get(key)
        lab = f"{thr}: " + describe_resolution(summary, key[:-len("_angstrom")])
        ax.axhline(thr, color=col, lw=0.8, ls=":", label=lab)
        if res:
            ax.axvline(1.0 / res, color=col, lw=0.8, ls=":")
    ax.set_xlabel("spatial frequency (1/angstrom)")
    ax.set_ylabel("correlation")
    ax.set_xlim(0, f[-1] if f.size else 1)
    ax.set_ylim(-0.2, 1.05)
    # Top axis: resolution 1/f at the bottom axis's (non-zero) tick positions.
    ticks = [t for t in ax.get_xticks() if 0 < t <= ax.get_xlim()[1]]
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, labels=[f"{1.0 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (angstrom)")
    ax.set_title(f"FSC vs {summary.get('truth_name', 'truth')} "
                 f"(hand: {summary.get('density_hand')})")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sections(path: Path, rec: np.ndarray, truth: np.ndarray, title: str,
                  log: bool = False) -> None:
    """Central sections (three orthogonal planes through the centre voxel), rec over truth."""
    plt = _pyplot()
    m = rec.shape[0]
    c = m // 2
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.2), layout="constrained")

    def prep(v: np.ndarray) -> np.ndarray:
        if not log:
            return v
        vmax = float(np.max(truth))
        return np.log10(np.maximum(v, vmax * 1e-8 if vmax > 0 else 1e-30))

    both = [prep(rec), prep(truth)]
    lo = min(float(np.min(b)) for b in both)
    hi = max(float(np.max(b)) for b in both)
    planes = (("x = 0 (axes 1, 2)", lambda v: v[c, :, :]),
              ("y = 0 (axes 0, 2)", lambda v: v[:, c, :]),
              ("z = 0 (axes 0, 1)", lambda v: v[:, :, c]))
    im = None
    for row, (vol, lab) in enumerate(zip(both, ("reconstruction (aligned)", "truth"))):
        for col, (pname, cut) in enumerate(planes):
            ax = axes[row, col]
            im = ax.imshow(cut(vol).T, origin="lower", cmap="viridis", vmin=lo, vmax=hi)
            ax.set_title(f"{lab}\n{pname}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 intensity" if log else "density")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_orientation_errors(path: Path, errors_deg: np.ndarray,
                            summary: dict[str, Any]) -> None:
    """Histogram of per-image orientation errors after the global rotation."""
    plt = _pyplot()
    e = np.asarray(errors_deg, dtype=np.float64)
    e = e[np.isfinite(e)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    ax.hist(e, bins=np.linspace(0, 180, 91), color="tab:blue")
    stats = summary.get("orientation_error_deg") or {}
    if stats.get("median") is not None:
        ax.axvline(stats["median"], color="k", ls="--", lw=1,
                   label=f"median {stats['median']:.2f} deg")
    gs = stats.get("grid_spacing_deg")
    if gs:
        frac = stats.get("frac_within_grid_spacing")
        ax.axvline(gs, color="tab:red", ls=":", lw=1,
                   label=f"grid spacing {gs:.2f} deg ({100 * frac:.0f}% within)")
    ax.set_yscale("log")
    ax.set_xlabel("orientation error (degrees)")
    ax.set_ylabel("images")
    ax.set_title(f"{e.size} images, convention: {summary.get('orientation_convention')}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _convergence_series(metrics: dict[str, Any]) -> dict[str, tuple[list, list]]:
    """Per-generation numeric series found in metrics.json, by label."""
    series: dict[str, tuple[list, list]] = {}
    getters = {
        "density correlation": ("evaluation", "density_correlation"),
        "FSC 0.5 resolution (A)": ("evaluation", "fsc_resolution_0p5_angstrom"),
        "FSC 0.143 resolution (A)": ("evaluation", "fsc_resolution_0p143_angstrom"),
        "median orientation error (deg)": ("evaluation", "orientation_error_deg", "median"),
        "orientation change": ("orientation_change",),
        "CG iterations": ("cg_iterations",),
        "lambda": ("lambda",),
    }
    gens = metrics.get("generations") if isinstance(metrics, dict) else None
    for i, gen in enumerate(gens or []):
        if not isinstance(gen, dict):
            continue
        g = gen.get("generation", i)
        for label, keys in getters.items():
            v: Any = gen
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                series.setdefault(label, ([], []))
                series[label][0].append(g)
                series[label][1].append(float(v))
        t = gen.get("timings")
        if isinstance(t, dict):
            tot = sum(float(x) for x in t.values() if isinstance(x, (int, float)))
            series.setdefault("generation time (s)", ([], []))
            series["generation time (s)"][0].append(g)
            series["generation time (s)"][1].append(tot)
    return series


def plot_convergence(path: Path, metrics: dict[str, Any]) -> bool:
    """One panel per per-generation number present in metrics.json; False if none."""
    series = _convergence_series(metrics)
    if not series:
        return False
    plt = _pyplot()
    n = len(series)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow),
                             layout="constrained", squeeze=False)
    for ax, (label, (x, y)) in zip(axes.ravel(), series.items()):
        ax.plot(x, y, "o-", ms=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("generation")
        if label == "lambda" and min(y) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle("convergence")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def make_plots(out_dir: Path, summary: dict[str, Any], arrays: dict[str, Any],
               metrics: dict[str, Any] | None) -> list[str]:
    """Write the evaluation PNGs into ``out_dir``; returns the file names written."""
    out_dir = Path(out_dir)
    written = []
    plot_fsc(out_dir / "fsc.png", summary)
    written.append("fsc.png")
    plot_sections(out_dir / "sections_density.png", arrays["density"], arrays["truth_density"],
                  f"density, correlation {_num(summary.get('density_correlation'))}")
    written.append("sections_density.png")
    plot_sections(out_dir / "sections_intensity.png", arrays["intensity"],
                  arrays["truth_intensity"],
                  f"intensity (log10), correlation "
                  f"{_num(summary.get('intensity_log_correlation'))} in log",
                  log=True)
    written.append("sections_intensity.png")
    if arrays.get("orientation_errors_deg") is not None:
        plot_orientation_errors(out_dir / "orientation_errors.png",
                                arrays["orientation_errors_deg"], summary)
        written.append("orientation_errors.png")
    if metrics and plot_convergence(out_dir / "convergence.png", metrics):
        written.append("convergence.png")
    return written
