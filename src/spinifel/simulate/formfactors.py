"""Atomic X-ray form factors of neutral atoms.

``f(s) = sum_{i=1..4} a_i exp(-b_i (|s|/2)^2) + c``: the four-Gaussian fit of
International Tables for Crystallography Vol. C (1992), Table 6.1.1.4 (Waasmaier-Kirfel
predecessors; "IT92"), whose argument is ``sin(theta)/lambda`` in inverse angstrom. Our
reciprocal coordinate is ``|s| = 2 sin(theta)/lambda``, hence the ``|s|/2``. The
coefficients are taken from gemmi, which ships that table (``gemmi.Element(sym).it92``);
``b_i`` are in angstrom^2 and ``f`` is in electrons. The fits are valid for
``sin(theta)/lambda <= 2`` (``|s| <= 4`` inverse angstrom), far beyond SPI resolutions, and
reproduce ``f(0) = Z`` to about 0.01 electron.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=None)
def it92_coefficients(element: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Four-Gaussian coefficients ``(a, b, c)`` of ``element`` from IT Vol. C Table 6.1.1.4.

    Parameters
    ----------
    element : str
        Element symbol, case-insensitive (``"C"``, ``"Zn"``, ``"SE"``).

    Returns
    -------
    a : ndarray, shape (4,), float64
        Amplitudes in electrons.
    b : ndarray, shape (4,), float64
        Widths in angstrom^2 (for the argument ``sin(theta)/lambda``).
    c : float
        Constant in electrons.

    Raises
    ------
    ValueError
        If the symbol is not an element with tabulated coefficients.
    """
    import gemmi  # imported here so that importing this module stays cheap

    sym = str(element).strip()
    el = gemmi.Element(sym)
    coef = el.it92 if el.atomic_number > 0 else None
    if coef is None:
        raise ValueError(f"no IT92 form factor for element {element!r}")
    a = np.asarray(coef.a, dtype=np.float64)
    b = np.asarray(coef.b, dtype=np.float64)
    if a.shape != (4,) or b.shape != (4,):
        raise ValueError(f"IT92 coefficients of {element!r} have unexpected shape {a.shape}")
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b, float(coef.c)


def atomic_number(element: str) -> int:
    """Atomic number ``Z`` of an element symbol (0 for an unknown symbol)."""
    import gemmi

    return int(gemmi.Element(str(element).strip()).atomic_number)


def form_factor(element: str, s_norm: np.ndarray) -> np.ndarray:
    """Form factor ``f(|s|)`` of a neutral atom, in electrons.

    Parameters
    ----------
    element : str
        Element symbol.
    s_norm : array_like of float
        ``|s| = 2 sin(theta)/lambda`` in **inverse angstrom**, any shape.

    Returns
    -------
    ndarray, float64, shape of ``s_norm``
    """
    a, b, c = it92_coefficients(str(element).strip().capitalize())
    stol2 = (0.5 * np.asarray(s_norm, dtype=np.float64)) ** 2
    out = np.full(stol2.shape, c, dtype=np.float64)
    for ai, bi in zip(a, b):
        out += ai * np.exp(-bi * stol2)
    return out
