"""NUFFT plan wrapper: one place that knows finufft (CPU) and cufinufft (GPU).

Conventions (docs/architecture.md): a grid of ``n`` modes per axis uses finufft's centred
mode order (modes ``-(n//2) .. (n-1)//2``), so for odd ``M`` the array index ``l`` is the
mode ``l - (M-1)/2``. Points are in radians, ``[-pi, pi]``.

* :class:`Type2` evaluates ``f(x_p) = sum_k c_k exp(+i k.x_p)`` (slicing);
* :class:`Type1` computes ``c_k = sum_p v_p exp(-i k.x_p)`` (the adjoint; merging).

Plans run on the array module given at creation (``xp``): finufft for numpy, cufinufft
for cupy (device arrays in and out, no host copies).

Plans are created once and reused: ``setpts`` for a new set of points (one batch of
orientations, or the local images of a generation), ``execute`` as often as needed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from spinifel.backend.arrays import to_module

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
    """Common part of the type-1/type-2 plans: finufft on the host, cufinufft on a GPU.

    The library follows ``xp``: numpy plans take and return numpy arrays (finufft), cupy
    plans take and return cupy arrays on the current device (cufinufft). Assumed API
    (finufft and cufinufft >= 2.2): ``Plan(nufft_type, n_modes, n_trans=, eps=, isign=,
    dtype="complex64"|"complex128", **opts)``, ``plan.setpts(x, y, z)``,
    ``plan.execute(data, out=None)``; ``n_modes`` in array-shape order and ``x`` the
    coordinate along the first array axis in both, so host and device plans agree.
    """

    def __init__(self, nufft_type: int, n_modes: tuple[int, int, int], eps: float,
                 dtype: np.dtype | type, nthreads: int = 1, n_trans: int = 1, xp=np):
        self.real_dtype = np.dtype(dtype)
        if self.real_dtype not in _COMPLEX:
            raise TypeError(f"NUFFT dtype must be float32 or float64, got {self.real_dtype}")
        self.complex_dtype = np.dtype(_COMPLEX[self.real_dtype])
        # Single precision cannot reach below ~1e-6; clamp rather than fail.
        if self.real_dtype == np.float32:
            eps = max(eps, 2e-6)
        self.n_modes = tuple(int(n) for n in n_modes)
        self.n_trans = n_trans
        self.xp = xp
        isign = 1 if nufft_type == 2 else -1
        if xp is np:
            import finufft

            self._plan = finufft.Plan(nufft_type, self.n_modes, n_trans=n_trans, eps=eps,
                                      isign=isign, dtype=self.complex_dtype.name,
                                      nthreads=nthreads, modeord=0)
        else:
            import cufinufft

            # cufinufft runs on opts.gpu_device_id (default 0), not on CuPy's current
            # device: pass the device this rank was bound to.
            self._plan = cufinufft.Plan(nufft_type, self.n_modes, n_trans=n_trans, eps=eps,
                                        isign=isign, dtype=self.complex_dtype.name, modeord=0,
                                        gpu_device_id=int(xp.cuda.Device().id))
        self._pts: tuple | None = None
        self.n_points = 0

    def setpts(self, points) -> None:
        """Set the non-uniform points.

        Parameters
        ----------
        points : array, shape (3, n_points)
            Coordinates in radians, in ``[-pi, pi]``; converted to the plan's real dtype
            and array module.
        """
        xp = self.xp
        pts = to_module(points, xp)
        if pts.ndim != 2 or pts.shape[0] != 3:
            raise ValueError(f"points must have shape (3, n), got {pts.shape}")
        # Both libraries keep pointers to the coordinate arrays: hold contiguous copies alive.
        self._pts = tuple(xp.ascontiguousarray(pts[i], dtype=self.real_dtype) for i in range(3))
        self._plan.setpts(*self._pts)
        self.n_points = pts.shape[1]

    def _execute(self, data, out):
        c = self.xp.ascontiguousarray(to_module(data, self.xp), dtype=self.complex_dtype)
        return self._plan.execute(c, out=out)


class Type2(_Plan):
    """Uniform modes -> non-uniform points (``isign=+1``)."""

    def __init__(self, n_modes: tuple[int, int, int], eps: float, dtype=np.float32,
                 nthreads: int = 1, n_trans: int = 1, xp=np):
        super().__init__(2, n_modes, eps, dtype, nthreads, n_trans, xp)

    def execute(self, modes, out=None):
        """Evaluate at the current points; ``modes`` shape ``n_modes`` (or ``(n_trans,) + n_modes``).

        Returns an array of the plan's module, ``(n_points,)`` or ``(n_trans, n_points)``.
        """
        return self._execute(modes, out)


class Type1(_Plan):
    """Non-uniform points -> uniform modes (``isign=-1``), the adjoint of :class:`Type2`."""

    def __init__(self, n_modes: tuple[int, int, int], eps: float, dtype=np.float64,
                 nthreads: int = 1, n_trans: int = 1, xp=np):
        super().__init__(1, n_modes, eps, dtype, nthreads, n_trans, xp)

    def execute(self, values, out=None):
        """Sum ``values`` (``(n_points,)`` or ``(n_trans, n_points)``) onto the modes.

        Returns an array of the plan's module, ``n_modes`` or ``(n_trans,) + n_modes``.
        """
        return self._execute(values, out)
