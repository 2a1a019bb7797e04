"""Conjugate gradient for a symmetric positive definite operator given as a callback.

Used by the merge: the operator is the Toeplitz normal operator plus the Tikhonov term,
applied to real ``M^3`` arrays (the callback restricts to the support). Everything stays on
the array module of ``b`` (numpy or cupy). Host synchronisation: one per iteration, a
two-element copy of ``(p.Ap, r.r)`` for the breakdown and convergence tests (the step
sizes themselves are computed on the device), plus two before the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

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
