"""Ground-truth density and 3D intensity of a structure on the reconstruction grid.

Grid (docs/architecture.md): ``M`` odd, voxel ``d = 1 / (2 * reciprocal_extent)``; index
``l`` along an axis (axes in ``x, y, z`` order) is the position ``r = (l - (M-1)/2) d`` and,
on the intensity grid, the reciprocal position ``k = (l - (M-1)/2) / (M d)``.

What is computed:

* ``F[k] = sum_a f_Z(|k|) exp(-2 pi i k . r_a)`` exactly at the ``M^3`` reciprocal grid points,
  by a type-1 NUFFT per element (finufft, ``isign=-1``, points ``2 pi r_a / (M d)``: the
  modes are integers, so the periodic folding of points outside ``[-pi, pi)`` is exact).
* ``intensity = |F|^2`` in electrons^2.
* ``density = real(fftshift(ifftn(ifftshift(F)))) / d^3`` in electrons per angstrom^3: the
  molecule's electron density band-limited to the grid (a Fourier series on the periodic
  box of side ``M d``), so that ``d^3 * fftshift(fftn(ifftshift(density))) == F``.

Convention check (tested): with the circular autocorrelation
``ac[l] = d^3 * sum_j density[j] * density[j + l]`` (indices modulo ``M``, centred like the
density), ``intensity == d^3 * real(fftshift(fftn(ifftshift(ac))))``. The scalar linking the
pipeline's ``real(fftshift(fftn(ifftshift(ac))))`` to ``intensity`` is therefore ``d^3``
(angstrom^3) when ``ac`` is in electrons^2 per angstrom^3 as defined here.
"""

from __future__ import annotations

import logging

import numpy as np

from spinifel.simulate.formfactors import form_factor
from spinifel.simulate.structure import Structure

log = logging.getLogger("spinifel")


def voxel_size_angstrom(reciprocal_extent: float) -> float:
    """Real-space voxel ``d = 1 / (2 * reciprocal_extent)`` in angstrom.

    Parameters
    ----------
    reciprocal_extent : float
        Largest ``|s|`` of the detector in **inverse metres**.
    """
    if not np.isfinite(reciprocal_extent) or reciprocal_extent <= 0:
        raise ValueError(f"reciprocal_extent must be > 0 inverse metres, got {reciprocal_extent!r}")
    return 1e10 / (2.0 * float(reciprocal_extent))


def reciprocal_grid_axis(M: int, reciprocal_extent: float) -> np.ndarray:
    """Reciprocal coordinates ``(l - (M-1)/2) / (M d)`` of one grid axis, inverse angstrom."""
    d = voxel_size_angstrom(reciprocal_extent)
    return (np.arange(M) - (M - 1) / 2.0) / (M * d)


def grid_structure_factor(structure: Structure, M: int, reciprocal_extent: float,
                          eps: float = 1e-9, nthreads: int | None = None) -> np.ndarray:
    """Structure factor on the centred ``M^3`` reciprocal grid.

    Parameters
    ----------
    structure : Structure
        Atoms in angstrom.
    M : int
        Odd grid size >= 3.
    reciprocal_extent : float
        Inverse metres; sets ``d``.
    eps : float
        finufft precision.
    nthreads : int or None
        finufft threads.

    Returns
    -------
    ndarray, shape (M, M, M), complex128
        ``F`` at ``k = (l - (M-1)/2) / (M d)`` per axis, electrons.
    """
    import finufft

    M = int(M)
    if M < 3 or M % 2 == 0:
        raise ValueError(f"grid size M must be odd and >= 3, got {M}")
    d = voxel_size_angstrom(reciprocal_extent)
    box = M * d
    extent = float(np.abs(structure.xyz).max()) if structure.n_atoms else 0.0
    if extent > box / 2:
        log.warning("molecule reaches %.1f A from its centre but the %d^3 grid box is only "
                    "%.1f A wide: the ground-truth density wraps around", extent, M, box)
    groups = structure.element_groups()
    k = reciprocal_grid_axis(M, reciprocal_extent)
    k_norm = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    x = 2.0 * np.pi * structure.xyz / box
    # Fold to [-pi, pi): exact for integer modes, and keeps finufft inside its valid range.
    x = np.mod(x + np.pi, 2.0 * np.pi) - np.pi
    kw = {} if nthreads is None else {"nthreads": int(nthreads)}
    out = np.zeros((M, M, M), dtype=np.complex128)
    if not groups:
        return out
    n_el = len(groups)
    strengths = np.zeros((n_el, structure.n_atoms), dtype=np.complex128)
    for e, idx in enumerate(groups.values()):
        strengths[e, idx] = 1.0
    plan = finufft.Plan(1, (M, M, M), n_trans=n_el, eps=eps, isign=-1, modeord=0, **kw)
    plan.setpts(np.ascontiguousarray(x[:, 0]), np.ascontiguousarray(x[:, 1]),
                np.ascontiguousarray(x[:, 2]))
    g = plan.execute(strengths if n_el > 1 else strengths[0]).reshape(n_el, M, M, M)
    for e, el in enumerate(groups):
        out += form_factor(el, k_norm) * g[e]
    return out


def render_ground_truth(structure: Structure, M: int, reciprocal_extent: float,
                        eps: float = 1e-9,
                        nthreads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Band-limited density and 3D intensity of ``structure`` on the ``M^3`` grid.

    Parameters
    ----------
    structure : Structure
        Atoms in angstrom, centred (the origin maps to voxel ``(M-1)/2``).
    M : int
        Odd grid size.
    reciprocal_extent : float
        Detector's largest ``|s|`` in **inverse metres**; ``d = 1 / (2 reciprocal_extent)``.
    eps : float
        finufft precision of the grid structure factor.
    nthreads : int or None
        finufft threads.

    Returns
    -------
    density : ndarray, shape (M, M, M), float32
        Electrons per angstrom^3 at ``r = (l - (M-1)/2) d`` (see module docstring).
    intensity : ndarray, shape (M, M, M), float32
        ``|F|^2`` in electrons^2 at ``k = (l - (M-1)/2) / (M d)``.
    """
    F = grid_structure_factor(structure, M, reciprocal_extent, eps=eps, nthreads=nthreads)
    d = voxel_size_angstrom(reciprocal_extent)
    density = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(F))).real / d**3
    intensity = F.real ** 2 + F.imag ** 2
    return density.astype(np.float32), intensity.astype(np.float32)
