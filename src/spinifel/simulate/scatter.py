"""Molecular structure factors at arbitrary reciprocal positions.

``F(s) = sum_atoms f_Z(|s|) exp(-2 pi i s . r_a)`` with ``s`` in inverse angstrom,
``r_a`` in angstrom and ``f_Z`` the IT92 form factors (:mod:`.formfactors`). Grouping the
atoms by element, ``F(s) = sum_Z f_Z(|s|) G_Z(s)`` where ``G_Z`` is a plain exponential sum
over the atoms of element ``Z``: a type-3 (non-uniform to non-uniform) NUFFT. All elements
share one finufft plan with ``n_trans = n_elements`` (one transform per element, the
element's atoms given unit strength, the others zero), so the target points are sorted and
the kernel's Fourier factors evaluated once. The intensity is ``|F|^2`` in electrons^2.
"""

from __future__ import annotations

import numpy as np

from spinifel.simulate.formfactors import form_factor
from spinifel.simulate.structure import Structure


def _check_s(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != 3:
        raise ValueError(f"reciprocal positions s must have shape (3, n), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("reciprocal positions s contain non-finite values")
    return s


class StructureFactorPlan:
    """A reusable type-3 NUFFT evaluator of ``F(s)`` for one structure.

    The source points (atoms) are fixed; each call sets new target points ``s``. Reusing
    the object across batches keeps the per-element strength matrix and form factor
    tables.

    Parameters
    ----------
    structure : Structure
        Atoms in angstrom.
    eps : float
        Requested relative precision of finufft (1e-15 .. 1e-1). The error is relative to
        the sum of the absolute atom contributions per element.
    nthreads : int or None
        OpenMP threads for finufft (``None``: finufft's default, all cores).
    s_bound : float or None
        If given (inverse angstrom), every target component must satisfy
        ``|s_i| <= s_bound`` and the NUFFT's target box is pinned to ``[-s_bound, s_bound]^3``
        (two phantom targets at the corners are added and dropped). With ``nthreads=1`` the
        value at each target is then bitwise independent of which other targets share the
        call, so results do not depend on batching or on the number of MPI ranks.

    Notes
    -----
    The upsampling factor is fixed at 2 (finufft's automatic choice depends on the thread
    count and point density, which would make results depend on the batching).
    """

    def __init__(self, structure: Structure, eps: float = 1e-6,
                 nthreads: int | None = None, s_bound: float | None = None) -> None:
        if not 1e-15 <= eps < 1e-1:
            raise ValueError(f"eps must be in [1e-15, 1e-1), got {eps}")
        if s_bound is not None and not (np.isfinite(s_bound) and s_bound > 0):
            raise ValueError(f"s_bound must be a positive number of inverse angstrom, "
                             f"got {s_bound!r}")
        self.structure = structure
        self.eps = float(eps)
        self.nthreads = nthreads
        self.s_bound = None if s_bound is None else float(s_bound)
        groups = structure.element_groups()
        self.elements = list(groups)
        # One row of unit strengths per element (its atoms), zero elsewhere.
        self._strengths = np.zeros((len(self.elements), structure.n_atoms), dtype=np.complex128)
        for k, idx in enumerate(groups.values()):
            self._strengths[k, idx] = 1.0
        self._x = np.ascontiguousarray(structure.xyz[:, 0])
        self._y = np.ascontiguousarray(structure.xyz[:, 1])
        self._z = np.ascontiguousarray(structure.xyz[:, 2])

    def element_sums(self, s: np.ndarray) -> np.ndarray:
        """``G_Z(s) = sum_{a in Z} exp(-2 pi i s . r_a)`` per element.

        Parameters
        ----------
        s : ndarray, shape (3, n), float64
            Inverse angstrom.

        Returns
        -------
        ndarray, shape (n_elements, n), complex128
            Rows in the order of :attr:`elements`.
        """
        import finufft

        s = _check_s(s)
        n = s.shape[1]
        n_el = len(self.elements)
        if n == 0 or n_el == 0:
            return np.zeros((n_el, n), dtype=np.complex128)
        kw = {} if self.nthreads is None else {"nthreads": int(self.nthreads)}
        plan = finufft.Plan(3, 3, n_trans=n_el, eps=self.eps, isign=-1, upsampfac=2.0, **kw)
        if self.s_bound is not None:
            largest = float(np.abs(s).max())
            if largest > self.s_bound:
                raise ValueError(f"reciprocal positions reach |s_i| = {largest:.6g} 1/A, "
                                 f"beyond s_bound = {self.s_bound:.6g} 1/A")
            corners = np.array([[1.0, -1.0]] * 3) * self.s_bound
            s = np.concatenate([s, corners], axis=1)
        two_pi_s = 2.0 * np.pi * s
        plan.setpts(self._x, self._y, self._z, two_pi_s[0], two_pi_s[1], two_pi_s[2])
        out = plan.execute(self._strengths if n_el > 1 else self._strengths[0])
        return out.reshape(n_el, -1)[:, :n]

    def __call__(self, s: np.ndarray, s_norm: np.ndarray | None = None) -> np.ndarray:
        """``F(s)``, shape ``(n,)`` complex128, electrons.

        ``s_norm`` (shape ``(n,)``, inverse angstrom) may pass precomputed ``|s|``: it is
        unchanged by rotations, so a detector's form factors serve every orientation.
        """
        g = self.element_sums(s)
        if s_norm is None:
            s_norm = np.linalg.norm(_check_s(s), axis=0)
        f = np.zeros(g.shape[1], dtype=np.complex128)
        for k, el in enumerate(self.elements):
            f += form_factor(el, s_norm) * g[k]
        return f


def structure_factor(structure: Structure, s: np.ndarray, eps: float = 1e-6,
                     nthreads: int | None = None) -> np.ndarray:
    """Structure factor ``F(s)`` by type-3 NUFFT.

    Parameters
    ----------
    structure : Structure
        Atoms in angstrom.
    s : ndarray, shape (3, n), float64
        Reciprocal positions in **inverse angstrom** (``|s| = 2 sin(theta)/lambda``).
    eps : float
        finufft precision; the relative error of ``F`` is of order ``eps``.
    nthreads : int or None
        finufft threads.

    Returns
    -------
    ndarray, shape (n,), complex128
        ``sum_a f_Z(|s|) exp(-2 pi i s . r_a)`` in electrons.
    """
    return StructureFactorPlan(structure, eps=eps, nthreads=nthreads)(s)


def structure_factor_direct(structure: Structure, s: np.ndarray,
                            chunk: int = 4096) -> np.ndarray:
    """Reference direct sum of :func:`structure_factor` (``O(n_atoms * n)``, for tests).

    Parameters and result as :func:`structure_factor`.
    """
    s = _check_s(s)
    s_norm = np.linalg.norm(s, axis=0)
    out = np.zeros(s.shape[1], dtype=np.complex128)
    for el, idx in structure.element_groups().items():
        f = form_factor(el, s_norm)
        r = structure.xyz[idx]
        for a in range(0, s.shape[1], chunk):
            phase = -2.0 * np.pi * (r @ s[:, a:a + chunk])
            out[a:a + chunk] += f[a:a + chunk] * np.exp(1j * phase).sum(axis=0)
    return out


def intensity(structure: Structure, s: np.ndarray, eps: float = 1e-6,
              nthreads: int | None = None) -> np.ndarray:
    """``|F(s)|^2``, shape ``(n,)`` float64, electrons^2; ``s`` as :func:`structure_factor`."""
    f = structure_factor(structure, s, eps=eps, nthreads=nthreads)
    return f.real ** 2 + f.imag ** 2
