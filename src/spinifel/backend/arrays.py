"""Array-module helpers: numpy on the host, cupy on a GPU, chosen from the input.

The array module is always derived from the data (never a module-level global), so the
same numerical code runs on host or device arrays. cupy is imported only when an input
already is a cupy array, so this module works (and imports) without cupy installed.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np


def _is_cupy_array(x: Any) -> bool:
    # Checking the type's module avoids importing cupy when it is absent or unused.
    return type(x).__module__.startswith("cupy")


def get_array_module(*arrays: Any) -> ModuleType:
    """Array module (``numpy`` or ``cupy``) of the given arrays.

    Parameters
    ----------
    *arrays : array-like
        Any objects; ``None`` and Python scalars are allowed and count as host data.

    Returns
    -------
    module
        ``cupy`` if any argument is a cupy array, else ``numpy``.
    """
    for x in arrays:
        if _is_cupy_array(x):
            # cupy is necessarily installed (and already imported) when one of its arrays exists.
            return importlib.import_module("cupy")
    return np


def to_host(x: Any) -> np.ndarray:
    """Copy ``x`` to a host numpy array (no copy if it already is one).

    Parameters
    ----------
    x : array-like
        numpy or cupy array, or anything ``numpy.asarray`` accepts.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``x``.
    """
    if _is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def asarray_like(x: Any, like: Any, dtype: Any = None) -> Any:
    """``x`` as an array of the same module (and device) as ``like``.

    Parameters
    ----------
    x : array-like
        Data to convert (numpy, cupy, list, scalar).
    like : array
        Reference array; its module decides where the result lives.
    dtype : dtype, optional
        Result dtype; by default that of ``x`` (as the module infers it).

    Returns
    -------
    array
        A numpy array if ``like`` is a numpy array, a cupy array if ``like`` is a cupy
        array. No copy is made when ``x`` already qualifies.
    """
    xp = get_array_module(like)
    if xp is np:
        return np.asarray(to_host(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def to_module(x: Any, xp: Any, dtype: Any = None) -> Any:
    """``x`` as an array of module ``xp`` (numpy: host copy if needed; cupy: device copy).

    Parameters
    ----------
    x : array-like
        numpy or cupy array, list or scalar.
    xp : module
        ``numpy`` or ``cupy``.
    dtype : dtype, optional
        Result dtype (default: that of ``x``).
    """
    if xp is np:
        return np.asarray(to_host(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def fft_workers(xp: Any, n: int) -> Any:
    """Context in which the host FFTs of :func:`fft_module` use ``n`` threads
    (``scipy.fft.set_workers``); a no-op for device arrays."""
    if xp is np and n > 1:
        import scipy.fft

        return scipy.fft.set_workers(int(n))
    import contextlib

    return contextlib.nullcontext()


def fft_module(xp: Any) -> Any:
    """FFT namespace for ``xp``: ``scipy.fft`` for numpy (it keeps float32 in single
    precision and is 2-3x faster than ``numpy.fft`` there), ``cupy.fft`` for cupy."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft
