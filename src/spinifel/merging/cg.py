"""Conjugate gradient for a symmetric positive definite operator given as a callback.

Used by the merge: the operator is the Toeplitz normal operator plus the Tikhonov term,
applied to real ``M^3`` arrays (the callback restricts to the support). Everything stays on
the array module of ``b`` (numpy or cupy). Host synchronisation: one per iteration, a
two-element copy of ``(p.Ap, r.r)`` for the breakdown and convergence tests (the step
sizes themselves are computed on the device), plus two before the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spinifel.backend.arrays import get_array_module, to_host


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes
    ----------
    x : array
        Solution estimate, same shape, dtype and array module as ``b``.
    n_iter : int
        Number of iterations done (operator applications after the initial residual).
    residual_norms : list of float
        ``||r_k||`` for k = 0 .. n_iter (the initial residual first), as computed by the
        recurrence (not recomputed from ``b - A x``).
    converged : bool
        True when ``||r|| <= tol * ||b||`` was reached.
    """

    x: Any
    n_iter: int
    residual_norms: list[float] = field(default_factory=list)
    converged: bool = False


def _real_vdot(a: Any, b: Any) -> Any:
    """Real inner product over all elements (``Re sum conj(a) * b``), a 0-d array of the
    inputs' module (no host synchronisation)."""
    xp = get_array_module(a, b)
    return xp.real(xp.vdot(a, b))


def conjugate_gradient(
    apply_a: Callable[[Any], Any],
    b: Any,
    x0: Any = None,
    *,
    max_iter: int,
    tol: float,
    dot: Callable[[Any, Any], float] | None = None,
) -> CGResult:
    """Solve ``A x = b`` for symmetric positive definite ``A`` by conjugate gradients.

    Parameters
    ----------
    apply_a : callable
        ``apply_a(v) -> A v``, same shape as ``v``. Must be symmetric positive definite
        under ``dot``.
    b : array
        Right-hand side, any shape (e.g. ``(M, M, M)`` float64). Its array module (numpy
        or cupy) is used throughout.
    x0 : array or None
        Initial guess (warm start), same shape as ``b``; zeros when None.
    max_iter : int
        Maximum number of iterations, >= 0.
    tol : float
        Relative tolerance, >= 0: stop when ``||r|| <= tol * ||b||``.
    dot : callable, optional
        Inner product ``dot(u, v)`` returning a float or a 0-d array of ``b``'s module.
        Default: ``Re(vdot(u, v))`` over all elements, kept on the device.

    Returns
    -------
    CGResult
        ``converged`` is False when ``max_iter`` was reached or the operator broke down
        (``p^T A p <= 0``: not positive definite, or the residual vanished to round-off).

    Notes
    -----
    When ``b == 0`` the solution of an SPD system is 0: ``x0`` is returned unchanged if it
    is zero, else zeros, with ``converged=True`` and no iteration.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not (tol >= 0.0 and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    xp = get_array_module(b)
    if dot is None:
        dot = _real_vdot
    if x0 is None:
        x = xp.zeros_like(b)
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {b.shape}, got {x0.shape}")
        x = x0.copy()

    b_norm = math.sqrt(max(float(dot(b, b)), 0.0))
    if b_norm == 0.0:
        # A x = 0 with A SPD has the unique solution 0.
        if float(dot(x, x)) != 0.0:
            x = xp.zeros_like(b)
        return CGResult(x=x, n_iter=0, residual_norms=[0.0], converged=True)
    threshold = tol * b_norm

    r = b - apply_a(x) if x0 is not None else b.copy()
    rr = xp.asarray(dot(r, r), dtype=xp.float64)
    norms = [math.sqrt(max(float(rr), 0.0))]
    if norms[0] <= threshold:
        return CGResult(x=x, n_iter=0, residual_norms=norms, converged=True)

    p = r.copy()
    n_iter = 0
    converged = False
    while n_iter < max_iter:
        ap = apply_a(p)
        pap = xp.asarray(dot(p, ap), dtype=xp.float64)
        # Step size on the device; a non-positive (or NaN) p.Ap gives a zero step, so x and
        # r are unchanged when the host check below stops the loop.
        ok = pap > 0
        alpha = xp.where(ok, rr / xp.where(ok, pap, 1.0), 0.0)
        x += alpha * p
        r -= alpha * ap
        rr_new = xp.asarray(dot(r, r), dtype=xp.float64)
        # The one synchronisation of the iteration: breakdown and convergence tests.
        pap_h, rr_h = (float(v) for v in to_host(xp.stack([pap, rr_new])))
        if not pap_h > 0.0:  # also catches NaN
            break
        n_iter += 1
        norms.append(math.sqrt(max(rr_h, 0.0)))
        if norms[-1] <= threshold:
            converged = True
            break
        p *= rr_new / rr
        p += r
        rr = rr_new
    return CGResult(x=x, n_iter=n_iter, residual_norms=norms, converged=converged)


@dataclass
class MultiShiftResult:
    """Outcome of :func:`multishift_cg`.

    Attributes
    ----------
    xs : list of arrays
        ``xs[k]`` solves ``(A + shifts[k] I) x = b`` (same shape, dtype and module as ``b``).
    n_iter : int
        Operator applications done (one per iteration, shared by all shifts).
    residual_norms : list of float
        Final recurrence residual norm ``||b - (A + shifts[k]) xs[k]||`` of each shift.
    converged : bool
        True when every shift reached ``||r_k|| <= tol * ||b||``.
    """

    xs: list
    n_iter: int
    residual_norms: list[float] = field(default_factory=list)
    converged: bool = False


def _zeta_step(zeta: float, zeta_prev: float, shift: float, alpha: float, alpha_prev: float,
               beta_prev: float) -> float:
    """Next ``zeta`` of the shifted-CG recurrence (Jegerlehner, hep-lat/9612014, eq. 2.33).

    ``zeta`` is the ratio of the shifted system's residual to the base system's residual
    (the two are collinear at every step: the Krylov space does not depend on the shift).
    """
    denom = (alpha * beta_prev * (zeta_prev - zeta)
             + zeta_prev * alpha_prev * (1.0 + shift * alpha))
    return zeta * zeta_prev * alpha_prev / denom if denom != 0.0 else 0.0


def multishift_cg(apply_a: Callable[[Any], Any], b: Any, shifts: list[float], *, max_iter: int,
                  tol: float) -> MultiShiftResult:
    """Solve ``(A + s I) x = b`` for every shift ``s`` with one Krylov space (zero start).

    Parameters
    ----------
    apply_a : callable
        ``apply_a(v) -> A v``; ``A + min(shifts) I`` must be symmetric positive definite
        (the base system, which converges last, is the one with the smallest shift).
    b : array
        Right-hand side, any shape, float64; numpy or cupy (followed throughout).
    shifts : list of float
        Shifts ``s_k``, any order, finite.
    max_iter, tol : int, float
        As in :func:`conjugate_gradient`; stop when every shifted residual is below
        ``tol * ||b||``.

    Returns
    -------
    MultiShiftResult
        ``xs`` in the order of ``shifts``.

    Notes
    -----
    One application of ``A`` per iteration whatever the number of shifts; each shift
    costs two vector updates per iteration. The shifted residual is ``zeta_k r`` with ``r``
    the base residual (Jegerlehner 1996; Frommer, Computing 70 (2003) 87), so its norm is
    known without another operator application.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not (tol >= 0.0 and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    if len(shifts) == 0:
        raise ValueError("multishift_cg needs at least one shift")
    xp = get_array_module(b)
    s0 = min(shifts)
    rel = [float(s) - s0 for s in shifts]
    xs = [xp.zeros_like(b) for _ in shifts]
    b_norm = math.sqrt(max(float(_real_vdot(b, b)), 0.0))
    if b_norm == 0.0:
        return MultiShiftResult(xs=xs, n_iter=0, residual_norms=[0.0] * len(shifts),
                                converged=True)
    threshold = tol * b_norm
    r = b.copy()
    p = b.copy()
    ps = [b.copy() for _ in shifts]
    zeta = [1.0] * len(shifts)
    zeta_prev = [1.0] * len(shifts)
    rr = float(_real_vdot(r, r))
    alpha_prev, beta_prev = 1.0, 0.0
    n_iter, converged = 0, False
    active = [True] * len(shifts)  # a converged shift stops updating (its p is freed)
    res_norms = [b_norm] * len(shifts)
    while n_iter < max_iter:
        ap = apply_a(p)
        if s0:
            ap += s0 * p
        pap = float(_real_vdot(p, ap))
        if not pap > 0.0:  # breakdown (also NaN)
            break
        alpha = rr / pap
        for k, s in enumerate(rel):
            if not active[k]:
                continue
            z_next = _zeta_step(zeta[k], zeta_prev[k], s, alpha, alpha_prev, beta_prev)
            xs[k] += (alpha * z_next / zeta[k] if zeta[k] else 0.0) * ps[k]
            zeta_prev[k], zeta[k] = zeta[k], z_next
        r -= alpha * ap
        rr_new = float(_real_vdot(r, r))
        n_iter += 1
        r_norm = math.sqrt(max(rr_new, 0.0))
        for k in range(len(rel)):
            if active[k]:
                res_norms[k] = abs(zeta[k]) * r_norm
                if res_norms[k] <= threshold:
                    active[k], ps[k] = False, None
        if not any(active):
            converged = True
            break
        beta = rr_new / rr
        for k in range(len(rel)):
            if not active[k]:
                continue
            ratio = zeta[k] / zeta_prev[k] if zeta_prev[k] else 0.0
            ps[k] *= beta * ratio * ratio
            ps[k] += zeta[k] * r
        p *= beta
        p += r
        rr, alpha_prev, beta_prev = rr_new, alpha, beta
    return MultiShiftResult(xs=xs, n_iter=n_iter, residual_norms=res_norms, converged=converged)
