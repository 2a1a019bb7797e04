"""Half-set (gold-standard) validation: the random split and the half-map FSC."""

from __future__ import annotations

from typing import Any

import numpy as np

from spinifel.evaluate.align import align_density
from spinifel.evaluate.fsc import fsc, resolution_fields, to_host


def half_assignment(n_images: int, seed: int) -> np.ndarray:
    """Which half every image of the file belongs to.

    A random, balanced split (not odd/even by index: shots that alternate between machine
    states, e.g. two-bunch modes, would put one state in each half). It depends only on
    ``n_images`` and ``seed``, so every rank computes the same split whatever the rank
    count.

    Parameters
    ----------
    n_images : int
        Number of images used by the run (file rows ``0 .. n_images - 1``).
    seed : int
        ``runtime.seed``.

    Returns
    -------
    ndarray, shape (n_images,), int8
        0 for half A, 1 for half B; ``n_images // 2`` images are in half B.
    """
    if n_images < 2:
        raise ValueError(f"half sets need at least 2 images, got {n_images}")
    rng = np.random.default_rng([int(seed), 0x4A1F])
    half = np.zeros(n_images, dtype=np.int8)
    half[rng.permutation(n_images)[: n_images // 2]] = 1
    return half


def half_map_fsc(density_a: Any, density_b: Any, voxel_size_angstrom: float) -> dict:
    """Align half-map B onto half-map A (shift and hand) and compute their FSC.

    The two halves are phased independently, so they may differ by a translation and by
    the inversion through the centre (the hand is not fixed by intensities); their
    relative rotation is fixed by the shared orientation assignment.

    Parameters
    ----------
    density_a, density_b : array, shape (M, M, M), real
        The two half-map densities on one grid.
    voxel_size_angstrom : float
        Real-space voxel size, angstrom.

    Returns
    -------
    dict
        ``freq_inv_angstrom`` and ``fsc`` (lists, one value per shell ``0 .. M // 2``),
        ``resolution_0p143_angstrom`` and ``resolution_0p5_angstrom`` (the first crossing,
        linear interpolation; None when never crossed, with ``..._reached``, ``..._status``
        and ``..._better_than_angstrom``: see
        :func:`~spinifel.evaluate.fsc.resolution_fields`),
        ``hand`` of B relative to A ("same"/"mirrored"), ``correlation`` (real space,
        after alignment).
    """
    a = to_host(density_a).astype(np.float64)
    b = to_host(density_b).astype(np.float64)
    aligned, info = align_density(b, a)
    freq, curve = fsc(a, aligned, voxel_size_angstrom)
    return {"freq_inv_angstrom": [float(x) for x in freq],
            "fsc": [None if not np.isfinite(x) else float(x) for x in curve],
            **resolution_fields("resolution_0p143", freq, curve, 0.143),
            **resolution_fields("resolution_0p5", freq, curve, 0.5),
            "hand": info["hand"], "correlation": float(info["correlation"])}
