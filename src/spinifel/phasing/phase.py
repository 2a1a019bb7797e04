"""Phasing of one generation: density and support from a merged autocorrelation.

Schedule (as in the original SpiniFEL): ``n_loops x (n_er ER, n_hio HIO, n_er ER,
shrinkwrap)`` then ``n_final_er`` ER. Every ER/HIO iteration costs one forward and one
inverse (real-to-complex) FFT; the Fourier errors of the iterations are kept on the device
and copied to the host once at the end.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spinifel.backend.arrays import asarray_like, get_array_module, to_host
from spinifel.phasing.algorithms import (
    _check_grid,
    _check_same_shape,
    _check_shrinkwrap_args,
    _er_iterations,
    _half,
    _half_weights,
    _hio_iterations,
    _shrinkwrap_device,
    amplitudes_from_autocorrelation,
    autocorrelation_from_density,
    fourier_error,
    support_from_autocorrelation,
)


@dataclass
class PhaseResult:
    """Outcome of :func:`phase`.

    Attributes
    ----------
    density : array, shape (M, M, M), dtype of the input autocorrelation
        Final density, >= 0 and 0 outside ``support``; centred (circular centre of mass at
        the centre voxel) unless ``center=False``. Array module of the input.
    support : array, shape (M, M, M), bool
        Final support (same shift as ``density``).
    autocorrelation : array, shape (M, M, M), dtype of the input
        Autocorrelation of ``density`` (:func:`autocorrelation_from_density`).
    fourier_error : float
        ``|| |F(density)| - A || / ||A||`` with ``A`` the amplitudes of the input
        autocorrelation.
    history : list of float
        The same relative Fourier error for the iterate entering each ER/HIO iteration, in
        order (length ``n_loops * (2 n_er + n_hio) + n_final_er``).
    """

    density: Any
    support: Any
    autocorrelation: Any
    fourier_error: float
    history: list[float] = field(default_factory=list)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _center(rho: Any, support: Any) -> tuple[Any, Any]:
    """Roll density and support so the circular centre of mass is at the centre voxel.

    The circular mean position along an axis is the phase of the first Fourier coefficient
    of the projection on that axis, which is well defined when the object straddles the
    periodic box edge.
    """
    xp = get_array_module(rho)
    shifts = []
    for axis, n in enumerate(rho.shape):
        other = tuple(a for a in range(3) if a != axis)
        profile = xp.sum(rho, axis=other)
        phase = xp.exp(-2j * xp.pi * xp.arange(n) / n)
        shifts.append(xp.sum(profile * phase))
    coeffs = to_host(xp.stack(shifts))  # one small transfer, after the loops
    if not np.all(np.isfinite(coeffs)) or np.any(np.abs(coeffs) == 0):
        return rho, support
    roll = []
    for c1, n in zip(coeffs, rho.shape):
        mean = (-np.angle(c1) * n / (2 * np.pi)) % n
        roll.append(int(round((n - 1) / 2 - mean)))
    return xp.roll(rho, roll, axis=(0, 1, 2)), xp.roll(support, roll, axis=(0, 1, 2))


def phase(
    ac: Any,
    *,
    n_loops: int,
    n_er: int,
    n_hio: int,
    beta: float,
    sw_sigma: float,
    sw_threshold: float,
    n_final_er: int,
    rng: np.random.Generator,
    rho0: Any = None,
    support0: Any = None,
    sw_mode: str = "max",
    support_fraction: float = 0.01,
    support_scale: float = 0.6,
    center: bool = True,
    fourier_mask: Any = None,
) -> PhaseResult:
    """Retrieve a density whose autocorrelation matches ``ac`` (ER / HIO / shrinkwrap).

    Parameters
    ----------
    ac : array, shape (M, M, M), float32 or float64, M odd
        Merged autocorrelation on the centred grid (numpy or cupy; the work is done on
        its array module and in its precision).
    n_loops : int
        Number of ``(n_er ER, n_hio HIO, n_er ER, shrinkwrap)`` cycles, >= 0.
    n_er, n_hio : int
        ER and HIO iterations per cycle, >= 0.
    beta : float
        HIO feedback parameter in (0, 1].
    sw_sigma : float
        Shrinkwrap Gaussian standard deviation, voxels.
    sw_threshold : float
        Shrinkwrap level (fraction of the maximum for ``sw_mode="max"``, multiple of the
        standard deviation for ``"std"``); see :func:`~spinifel.phasing.algorithms.shrinkwrap`.
    n_final_er : int
        ER iterations after the cycles, >= 0 (use >= 1 so the density satisfies the
        constraints).
    rng : numpy.random.Generator
        Source of the random start (used only when ``rho0`` is None).
    rho0 : array, shape (M, M, M), optional
        Warm start, e.g. the previous generation's (centred) density; cast to ``ac``'s dtype.
    support0 : array, shape (M, M, M) bool, optional
        Starting support; by default
        :func:`~spinifel.phasing.algorithms.support_from_autocorrelation` of ``ac`` with
        ``support_fraction`` and ``support_scale``.
    fourier_mask : array, shape (M, M, M) bool, optional
        Centred (like the intensity grid) mask of the measured Fourier coefficients. The
        amplitudes are imposed only there; elsewhere (the corners of the reciprocal cube
        beyond the detector's reach, the beamstop hole) the coefficients are left to the
        support constraint. None = impose everywhere. Must be centrosymmetric.
    sw_mode : {"max", "std"}
        Shrinkwrap level mode.
    support_fraction, support_scale : float
        Parameters of the default starting support.
    center : bool
        Roll the final density and support so the centre of mass is at the centre voxel
        (phase retrieval leaves the position free).

    Returns
    -------
    PhaseResult

    Raises
    ------
    ValueError
        For a bad shape, dtype or parameter, or an autocorrelation without positive
        intensity (nothing to phase).
    """
    _check_grid("ac", ac)
    n_loops, n_er, n_hio, n_final_er = (
        _check_count(name, v) for name, v in
        (("n_loops", n_loops), ("n_er", n_er), ("n_hio", n_hio), ("n_final_er", n_final_er)))
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    _check_shrinkwrap_args(sw_sigma, sw_threshold, sw_mode)
    xp = get_array_module(ac)
    dtype = ac.dtype

    amplitudes = amplitudes_from_autocorrelation(ac)
    amp_norm = float(xp.linalg.norm(amplitudes.ravel()))
    if not (amp_norm > 0.0 and math.isfinite(amp_norm)):
        raise ValueError(
            f"ac has no positive finite intensity to phase (||amplitudes|| = {amp_norm})"
        )

    rho, support = _starting_point(ac, rho0, support0, rng, support_fraction, support_scale)

    amp_half = _half(amplitudes)
    weights = _half_weights(ac.shape, xp, dtype)
    known, weights, amp_norm = _measured(fourier_mask, ac, amplitudes, weights, amp_norm)
    misfits: list[Any] = []
    empty_flags: list[Any] = []
    for _ in range(n_loops):
        rho = _er_iterations(rho, amp_half, support, weights, n_er, misfits, known)
        rho = _hio_iterations(rho, amp_half, support, weights, n_hio, beta, misfits, known)
        rho = _er_iterations(rho, amp_half, support, weights, n_er, misfits, known)
        support, empty = _shrinkwrap_device(rho, support, sw_sigma, sw_threshold, sw_mode)
        empty_flags.append(empty)
    rho = _er_iterations(rho, amp_half, support, weights, n_final_er, misfits, known)

    _warn_empty_supports(empty_flags, n_loops, xp)
    history = ((to_host(xp.sqrt(xp.stack(misfits))) / amp_norm).astype(float).tolist()
               if misfits else [])
    if center:
        rho, support = _center(rho, support)
    return PhaseResult(
        density=rho,
        support=support,
        autocorrelation=autocorrelation_from_density(rho),
        fourier_error=(fourier_error(rho, amplitudes) if known is None else
                       float(history[-1]) if history else float("nan")),
        history=history,
    )


def _starting_point(ac: Any, rho0: Any, support0: Any, rng: Any, support_fraction: float,
                    support_scale: float) -> tuple[Any, Any]:
    """``(rho, support)`` to start from: the given ones (copied), else a support from the
    autocorrelation and a uniform random density on it (``rng``), in ``ac``'s dtype/module."""
    if support0 is None:
        support = support_from_autocorrelation(ac, support_fraction, support_scale)
    else:
        _check_same_shape("support0", support0, "ac", ac)
        support = asarray_like(support0, ac, dtype=bool)
    if rho0 is None:
        start = rng.random(ac.shape).astype(ac.dtype)
        rho = asarray_like(start, ac) * support
    else:
        _check_same_shape("rho0", rho0, "ac", ac)
        rho = asarray_like(rho0, ac, dtype=ac.dtype).copy()
    return rho, support


def _warn_empty_supports(empty_flags: list, n_loops: int, xp: Any) -> None:
    """One RuntimeWarning when shrinkwrap emptied the support in some loops."""
    if not empty_flags:
        return
    n_empty = int(to_host(xp.sum(xp.stack(empty_flags))))
    if n_empty:
        warnings.warn(
            f"shrinkwrap produced an empty support in {n_empty} of {n_loops} loops; "
            "the previous support was kept",
            RuntimeWarning,
            stacklevel=3,
        )


def _measured(fourier_mask: Any, ac: Any, amplitudes: Any, weights: Any, amp_norm: float
              ) -> tuple[Any, Any, float]:
    """``(known, weights, amp_norm)`` restricted to the measured coefficients: the mask on
    the half-spectrum (None without a mask), the weights times it and the amplitudes' norm
    over it (unchanged without a mask)."""
    if fourier_mask is None:
        return None, weights, amp_norm
    _check_same_shape("fourier_mask", fourier_mask, "ac", ac)
    xp = get_array_module(ac)
    known = _half(xp.fft.ifftshift(asarray_like(fourier_mask, ac, dtype=bool)))
    measured = xp.fft.ifftshift(asarray_like(fourier_mask, ac, dtype=bool))
    amp_norm = float(xp.linalg.norm(xp.where(measured, amplitudes, 0).ravel()))
    return known, weights * known, amp_norm
