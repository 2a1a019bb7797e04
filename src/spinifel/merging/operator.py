"""The merge's linear operators on the ``M^3`` autocorrelation grid.

With ``A`` the type-2 NUFFT (grid -> rotated pixel positions) and ``D`` the pixel
weights, the least-squares normal operator for a real unknown ``x`` is
``N x = Re(A* D A x)``. It is a convolution: ``(N x)_j = sum_l x_l Re K(k_j - k_l)`` with
``K(m) = sum_p w_p exp(-i m.x_p)`` for ``m`` in ``[-M, M-1]^3`` (one type-1 NUFFT onto a
``(2M)^3`` grid: the Toeplitz trick). ``Re K`` is even in ``m``, so its spectrum is real
and each application is one real-to-complex FFT pair on the ``(2M)^3`` grid.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from spinifel.backend.nufft import Type1


def adjoint_to_grid(points: np.ndarray, values: np.ndarray, n: int, eps: float,
                    nthreads: int = 1) -> np.ndarray:
    """``c_k = sum_p v_p exp(-i k.x_p)`` on an ``(n, n, n)`` grid of centred modes.

    Parameters
    ----------
    points : ndarray (3, n_points), radians
    values : ndarray (n_trans, n_points) or (n_points,), real or complex
    n : int
        Modes per axis (``M`` for the right-hand side, ``2M`` for the Toeplitz kernel).

    Returns
    -------
    ndarray, complex128, shape ``(n, n, n)`` or ``(n_trans, n, n, n)``.
    """
    vals = np.asarray(values)
    n_trans = 1 if vals.ndim == 1 else vals.shape[0]
    plan = Type1((n, n, n), eps, np.float64, nthreads, n_trans=n_trans)
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
    circ = np.fft.ifftshift(np.ascontiguousarray(kernel.real, dtype=np.float64))
    spec = scipy.fft.rfftn(circ, workers=workers)
    # Re K is even, so its spectrum is real up to round-off.
    return np.ascontiguousarray(spec.real)


class ToeplitzNormalOperator:
    """``x -> P (Re(A* D A) + lam I) P x`` on the ``M^3`` grid, ``P`` the support projection.

    Parameters
    ----------
    spectrum : ndarray (2M, 2M, M + 1) float64
        From :func:`kernel_spectrum`.
    support : ndarray (M, M, M) bool or None
        Voxels where the autocorrelation may be non-zero (None = everywhere).
    workers : int
        FFT threads.
    """

    def __init__(self, spectrum: np.ndarray, support: np.ndarray | None = None, workers: int = 1):
        self.spectrum = spectrum
        self.n2 = spectrum.shape[0]
        self.M = self.n2 // 2
        self.support = support
        self.workers = workers
        self._pad = np.zeros((self.n2,) * 3)

    def normal(self, x: np.ndarray) -> np.ndarray:
        """``Re(A* D A) x`` for ``x`` (M, M, M) real, without the support projection."""
        M = self.M
        self._pad[:M, :M, :M] = x
        f = scipy.fft.rfftn(self._pad, workers=self.workers, overwrite_x=False)
        f *= self.spectrum
        y = scipy.fft.irfftn(f, s=self._pad.shape, workers=self.workers, overwrite_x=True)
        return y[:M, :M, :M].copy()

    def __call__(self, x: np.ndarray, lam: float = 0.0) -> np.ndarray:
        if self.support is not None:
            x = np.where(self.support, x, 0.0)
        y = self.normal(x)
        if lam:
            y += lam * x
        if self.support is not None:
            y[~self.support] = 0.0
        return y
