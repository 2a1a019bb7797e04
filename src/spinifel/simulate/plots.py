"""Quick-look PNG of simulated diffraction patterns."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def plot_patterns(dataset_path: str | os.PathLike, out_png: str | os.PathLike | None = None,
                  n: int = 6) -> Path:
    """Draw the first ``n`` patterns of a dataset on a log colour scale.

    Parameters
    ----------
    dataset_path : path-like
        HDF5 file written by :func:`spinifel.simulate.dataset.simulate_dataset`.
    out_png : path-like, optional
        Output file; default ``<dataset_path>.patterns.png`` next to the dataset.
    n : int
        Number of patterns (at most the number of images).

    Returns
    -------
    Path
        The PNG written.
    """
    import h5py
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, never at import time
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    dataset_path = Path(dataset_path)
    out = Path(out_png) if out_png is not None else dataset_path.with_name(
        dataset_path.name + ".patterns.png")
    with h5py.File(dataset_path, "r") as h5:
        k = int(min(n, h5["intensities"].shape[0]))
        imgs = np.asarray(h5["intensities"][:k, 0], dtype=np.float64)
        noisy = h5.attrs.get("noise", "none") == "poisson"
    positive = imgs[imgs > 0]
    vmin = 1.0 if noisy or positive.size == 0 else float(positive.min())
    vmax = max(float(imgs.max()), vmin * 10)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.8), squeeze=False)
    im = None
    for i, ax in enumerate(axes[0]):
        # Zero counts are shown at the floor of the colour scale.
        im = ax.imshow(np.maximum(imgs[i], vmin), origin="lower", cmap="magma",
                       norm=LogNorm(vmin=vmin, vmax=vmax))
        ax.set_title(f"image {i}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                     label="photons" if noisy else "|F|$^2$ (e$^2$)")
    fig.suptitle(dataset_path.name, fontsize=10)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
