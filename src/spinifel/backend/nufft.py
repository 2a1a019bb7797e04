"""NUFFT plan wrapper: one place that knows finufft (CPU) and cufinufft (GPU).

Conventions (docs/architecture.md): a grid of ``n`` modes per axis uses finufft's centred
mode order (modes ``-(n//2) .. (n-1)//2``), so for odd ``M`` the array index ``l`` is the
mode ``l - (M-1)/2``. Points are in radians, ``[-pi, pi]``.

* :class:`Type2` evaluates ``f(x_p) = sum_k c_k exp(+i k.x_p)`` (slicing);
* :class:`Type1` computes ``c_k = sum_p v_p exp(-i k.x_p)`` (the adjoint; merging).

Plans are created once and reused: ``setpts`` for a new set of points (one batch of
orientations, or the local images of a generation), ``execute`` as often as needed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger("spinifel")

_COMPLEX = {np.dtype(np.float32): np.complex64, np.dtype(np.float64): np.complex128}


def available_backends(order: Sequence[str], want_gpu: bool) -> tuple[str, dict[str, str]]:
    """First usable NUFFT backend in ``order`` and the reason each earlier one was skipped.

    Parameters
    ----------
    order : sequence of str
        Backend names in order of preference (``"cufinufft"``, ``"finufft"``).
    want_gpu : bool
        True when the array backend is CuPy (only cufinufft then fits), False for numpy
        (only finufft fits).
    """
    skipped: dict[str, str] = {}
    for name in order:
        if name == "cufinufft":
            if not want_gpu:
                skipped[name] = "array backend is numpy (cufinufft needs CuPy arrays)"
                continue
            try:
                import cufinufft  # noqa: F401
            except Exception as e:  # ImportError, CUDA library errors
                skipped[name] = f"cannot import cufinufft ({e.__class__.__name__}: {e})"
                continue
            return name, skipped
        if name == "finufft":
            if want_gpu:
                skipped[name] = "array backend is cupy (finufft works on host arrays)"
                continue
            try:
                import finufft  # noqa: F401
            except Exception as e:
                skipped[name] = f"cannot import finufft ({e.__class__.__name__}: {e})"
                continue
            return name, skipped
        skipped[name] = "unknown backend"
    raise RuntimeError("no usable NUFFT backend: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))


class _Plan:
    """Common part of the type-1/type-2 plans (finufft on the host)."""

    def __init__(self, nufft_type: int, n_modes: tuple[int, int, int], eps: float,
                 dtype: np.dtype | type, nthreads: int = 1, n_trans: int = 1):
        import finufft

        self.real_dtype = np.dtype(dtype)
        if self.real_dtype not in _COMPLEX:
            raise TypeError(f"NUFFT dtype must be float32 or float64, got {self.real_dtype}")
        self.complex_dtype = np.dtype(_COMPLEX[self.real_dtype])
        # Single precision cannot reach below ~1e-6; clamp rather than fail.
        if self.real_dtype == np.float32:
            eps = max(eps, 2e-6)
        self.n_modes = tuple(int(n) for n in n_modes)
        self.n_trans = n_trans
        isign = 1 if nufft_type == 2 else -1
        self._plan = finufft.Plan(nufft_type, self.n_modes, n_trans=n_trans, eps=eps, isign=isign,
                                  dtype=self.complex_dtype.name, nthreads=nthreads, modeord=0)
        self._pts: tuple | None = None
        self.n_points = 0

    def setpts(self, points: np.ndarray) -> None:
        """Set the non-uniform points.

        Parameters
        ----------
        points : ndarray, shape (3, n_points)
            Coordinates in radians, in ``[-pi, pi]``; converted to the plan's real dtype.
        """
        pts = np.asarray(points)
        if pts.ndim != 2 or pts.shape[0] != 3:
            raise ValueError(f"points must have shape (3, n), got {pts.shape}")
        # finufft keeps pointers to the coordinate arrays: hold contiguous copies alive.
        self._pts = tuple(np.ascontiguousarray(pts[i], dtype=self.real_dtype) for i in range(3))
        self._plan.setpts(*self._pts)
        self.n_points = pts.shape[1]


class Type2(_Plan):
    """Uniform modes -> non-uniform points (``isign=+1``)."""

    def __init__(self, n_modes: tuple[int, int, int], eps: float, dtype=np.float32,
                 nthreads: int = 1, n_trans: int = 1):
        super().__init__(2, n_modes, eps, dtype, nthreads, n_trans)

    def execute(self, modes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Evaluate at the current points; ``modes`` shape ``n_modes`` (or ``(n_trans,) + n_modes``)."""
        c = np.ascontiguousarray(modes, dtype=self.complex_dtype)
        return self._plan.execute(c, out=out)


class Type1(_Plan):
    """Non-uniform points -> uniform modes (``isign=-1``), the adjoint of :class:`Type2`."""

    def __init__(self, n_modes: tuple[int, int, int], eps: float, dtype=np.float64,
                 nthreads: int = 1, n_trans: int = 1):
        super().__init__(1, n_modes, eps, dtype, nthreads, n_trans)

    def execute(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Sum ``values`` (``(n_points,)`` or ``(n_trans, n_points)``) onto the modes."""
        c = np.ascontiguousarray(values, dtype=self.complex_dtype)
        return self._plan.execute(c, out=out)
