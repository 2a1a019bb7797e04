"""The merge's linear operators on the ``M^3`` autocorrelation grid.

With ``A`` the type-2 NUFFT (grid -> rotated pixel positions) and ``D`` the pixel
weights, the least-squares normal operator for a real unknown ``x`` is
``N x = Re(A* D A x)``. It is a convolution: ``(N x)_j = sum_l x_l Re K(k_j - k_l)`` with
``K(m) = sum_p w_p exp(-i m.x_p)`` for ``m`` in ``[-M, M-1]^3`` (one type-1 NUFFT onto a
``(2M)^3`` grid: the Toeplitz trick). ``Re K`` is even in ``m``, so its spectrum is real
and each application is one real-to-complex FFT pair on the ``(2M)^3`` grid.

Everything follows the array module of its input (numpy + scipy.fft + finufft on the host,
cupy + cupy.fft + cufinufft on a GPU).
"""

from __future__ import annotations

import numpy as np

from spinifel.backend.arrays import fft_module, get_array_module
from spinifel.backend.nufft import Type1


def adjoint_to_grid(points: np.ndarray, values: np.ndarray, n: int, eps: float,
                    nthreads: int = 1) -> np.ndarray:
    """``c_k = sum_p v_p exp(-i k.x_p)`` on an ``(n, n, n)`` grid of centred modes.

    Parameters
    ----------
    points : array (3, n_points), radians (numpy or cupy: the NUFFT library follows)
    values : array (n_trans, n_points) or (n_points,), real or complex, same module
    n : int
        Modes per axis (``M`` for the right-hand side, ``2M`` for the Toeplitz kernel).

    Returns
    -------
    ndarray, complex128, shape ``(n, n, n)`` or ``(n_trans, n, n, n)``.
    """
    xp = get_array_module(points, values)
    vals = xp.asarray(values)
    n_trans = 1 if vals.ndim == 1 else vals.shape[0]
    plan = Type1((n, n, n), eps, np.float64, nthreads, n_trans=n_trans, xp=xp)
    plan.setpts(points)
    return plan.execute(vals)


def kernel_spectrum(kernel: np.ndarray, workers: int = 1) -> np.ndarray:
    """Real spectrum of the circular Toeplitz kernel.

    Parameters
    ----------
    kernel : ndarray (2M, 2M, 2M)
        ``K(m)`` in centred mode order (index ``i`` is mode ``i - M``); only ``Re K`` is used.

    Returns
    -------
    ndarray float64, shape (2M, 2M, M + 1)
        ``rfftn`` of ``Re K`` in circular order (mode ``m`` at index ``m mod 2M``).
    """
    xp = get_array_module(kernel)
    circ = xp.fft.ifftshift(xp.ascontiguousarray(kernel.real, dtype=np.float64))
    spec = _rfftn(xp, circ, workers)
    # Re K is even, so its spectrum is real up to round-off.
    return xp.ascontiguousarray(spec.real)


def _rfftn(xp, x, workers):
    if xp is np:
        return fft_module(xp).rfftn(x, workers=workers)
    return fft_module(xp).rfftn(x, axes=(0, 1, 2))


def _irfftn(xp, f, shape, workers):
    if xp is np:
        return fft_module(xp).irfftn(f, s=shape, workers=workers, overwrite_x=True)
    return fft_module(xp).irfftn(f, s=shape, axes=(0, 1, 2))


class ToeplitzNormalOperator:
    """``x -> P (Re(A* D A) + lam I) P x`` on the ``M^3`` grid, ``P`` the support projection.

    Parameters
    ----------
    spectrum : array (2M, 2M, M + 1) float64
        From :func:`kernel_spectrum`; its array module is the operator's (``support`` is
        moved there).
    support : array (M, M, M) bool or None
        Voxels where the autocorrelation may be non-zero (None = everywhere).
    workers : int
        FFT threads (host only).
    """

    def __init__(self, spectrum, support=None, workers: int = 1):
        xp = get_array_module(spectrum)
        self.xp = xp
        self.spectrum = spectrum
        self.n2 = spectrum.shape[0]
        self.M = self.n2 // 2
        self.support = None if support is None else xp.asarray(support)
        self.workers = workers
        self._pad = xp.zeros((self.n2,) * 3)

    def normal(self, x: np.ndarray) -> np.ndarray:
        """``Re(A* D A) x`` for ``x`` (M, M, M) real, without the support projection."""
        M = self.M
        self._pad[:M, :M, :M] = x
        f = _rfftn(self.xp, self._pad, self.workers)
        f *= self.spectrum
        y = _irfftn(self.xp, f, self._pad.shape, self.workers)
        return y[:M, :M, :M].copy()

    def __call__(self, x, lam: float = 0.0):
        if self.support is not None:
            x = self.xp.where(self.support, x, 0.0)
        y = self.normal(x)
        if lam:
            y += lam * x
        if self.support is not None:
            y[~self.support] = 0.0
        return y
