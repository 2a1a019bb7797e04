"""``bench --compare``: our matching against faiss and scikit-learn on the same data.

The peers answer plain Euclidean nearest-neighbour queries, so the comparison is run in
that mode (``transform="none"``, no per-image scale): same float32 images, same model
slices, same metric. Each peer is timed end to end (building its index included) and its
answers are checked against ours (agreement fraction; different answers can only be
near-ties in float32). faiss-cpu and scikit-learn are optional (``pip install .[compare]``);
a missing one is reported as such, never an error.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from spinifel.orientation.matching import match_orientations


def _timed(fn) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def compare_matching(images: np.ndarray, slices: np.ndarray, threads: int = 1,
                     batch: int = 500) -> dict:
    """Nearest slice of every image by us, faiss ``IndexFlatL2`` and scikit-learn brute force.

    Parameters
    ----------
    images : ndarray, shape (n_images, P), float32
    slices : ndarray, shape (n_orientations, P), float32
        Model slices of the whole orientation grid.
    threads : int
        Threads given to faiss (OpenMP); numpy/scikit-learn use the BLAS threads set for
        the rank.
    batch : int
        Our slice batch (as ``algorithm.orientation_batch``).

    Returns
    -------
    dict
        ``{"ours": {...}, "faiss": {...}, "sklearn": {...}}``; each entry has ``seconds``
        and ``agreement`` (fraction of images with our answer), or ``available: False``
        and the import error.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    slices = np.ascontiguousarray(slices, dtype=np.float32)
    n = len(slices)
    t, st = _timed(lambda: match_orientations(
        images, ((o, slices[o:o + batch]) for o in range(0, n, batch)), False, 4096, "none"))
    ours = st.best_index
    out: dict[str, dict] = {"ours": {"seconds": t, "agreement": 1.0}}
    try:
        import faiss
    except ImportError as e:
        out["faiss"] = {"available": False, "reason": str(e)}
    else:
        faiss.omp_set_num_threads(int(threads))

        def run_faiss():
            index = faiss.IndexFlatL2(slices.shape[1])
            index.add(slices)
            return index.search(images, 1)[1][:, 0]

        t, idx = _timed(run_faiss)
        out["faiss"] = {"seconds": t, "agreement": float(np.mean(idx == ours)),
                        "version": faiss.__version__}
    try:
        import sklearn
        from sklearn.neighbors import NearestNeighbors
    except ImportError as e:
        out["sklearn"] = {"available": False, "reason": str(e)}
    else:
        def run_sklearn():
            nn = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(slices)
            return nn.kneighbors(images, return_distance=False)[:, 0]

        t, idx = _timed(run_sklearn)
        out["sklearn"] = {"seconds": t, "agreement": float(np.mean(idx == ours)),
                          "version": sklearn.__version__}
    for v in out.values():
        if "seconds" in v:
            v["ours_speedup"] = v["seconds"] / out["ours"]["seconds"]
    return out


def format_compare(res: dict) -> str:
    """One line per matcher: seconds, our speed-up over it, agreement with our answers."""
    lines = ["matching, plain Euclidean (transform none, no scale), same data:",
             f"  {'matcher':<10}{'seconds':>10}{'ours is x faster':>18}{'agreement':>11}"]
    for name, v in res.items():
        if "seconds" not in v:
            lines.append(f"  {name:<10}not installed ({v.get('reason', '')})")
            continue
        lines.append(f"  {name:<10}{v['seconds']:>10.3f}{v['ours_speedup']:>18.2f}"
                     f"{v['agreement']:>11.4f}")
    return "\n".join(lines)
