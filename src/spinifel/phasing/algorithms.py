"""Phase retrieval building blocks: Fourier projection, ER, HIO, shrinkwrap, supports.

Grid conventions (docs/architecture.md): the density ``rho``, its support and the
autocorrelation ``ac`` are real arrays on one ``M^3`` grid, ``M`` odd, index ``l`` at position
``(l - (M-1)/2) d``. With the unnormalised forward FFT of numpy/cupy::

    ac        = real(fftshift(ifftn(|fftn(ifftshift(rho))|^2)))   # circular autocorrelation
    intensity = real(fftshift(fftn(ifftshift(ac))))               # = fftshift(|F(rho)|^2)

Fourier magnitudes do not depend on where the origin is (a circular shift only changes
phases), so the iterations transform ``rho`` directly, without shifts. Amplitudes are kept in
the unshifted FFT order (``ifftshift`` of the centred intensity). Because ``rho`` is real and
the amplitudes obey Friedel's law (``A(-k) = A(k)``, true for amplitudes from a real
autocorrelation), the iterations use the real-to-complex FFT pair ``rfftn``/``irfftn``: one
forward and one inverse half-size transform per ER/HIO iteration, and the inverse is real
by construction ("take the real part").

All functions take numpy or cupy arrays and return arrays of the same module and real
dtype (float32 stays float32 with complex64 FFTs). Nothing here transfers to the host inside
an iteration loop.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from spinifel.backend.arrays import fft_module, get_array_module

_AXES = (0, 1, 2)
SHRINKWRAP_MODES = ("max", "std")


def _check_grid(name: str, x: Any) -> None:
    """Raise ValueError unless ``x`` is a real 3-D array with odd sizes."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"{name} must be a 3-D array (M, M, M), got shape {shape}")
    if any(n % 2 == 0 for n in shape):
        raise ValueError(f"{name} must have odd sizes (centre voxel at (M-1)/2), got shape {shape}")
    # dtypes are numpy dtypes for cupy arrays too.
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must have a real floating dtype, got {x.dtype}")


def _check_same_shape(name: str, x: Any, ref_name: str, ref: Any) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )


def _half(amplitudes: Any) -> Any:
    """Half-spectrum (rfftn layout) view of full unshifted-order amplitudes, contiguous."""
    xp = get_array_module(amplitudes)
    return xp.ascontiguousarray(amplitudes[..., : amplitudes.shape[-1] // 2 + 1])


def _half_weights(shape: tuple[int, int, int], xp: Any, dtype: Any) -> Any:
    """Multiplicity of each rfftn coefficient in the full spectrum (2 for mirrored planes)."""
    n_last = shape[-1] // 2 + 1
    w = xp.full(n_last, 2.0, dtype=dtype)
    w[0] = 1.0  # the k_last = 0 plane holds both k and -k itself (odd sizes: no Nyquist plane)
    return w


# ----------------------------------------------------------------------------------------
# Conventions
# ----------------------------------------------------------------------------------------


def autocorrelation_from_density(rho: Any) -> Any:
    """Circular autocorrelation of a density, centred.

    Parameters
    ----------
    rho : array, shape (M, M, M), float32 or float64
        Density on the centred grid (arbitrary units).

    Returns
    -------
    array, shape (M, M, M), dtype of ``rho``
        ``real(fftshift(ifftn(|fftn(ifftshift(rho))|^2)))``, i.e.
        ``ac[r] = sum_x rho[x] rho[x + r]`` (circular, unnormalised), origin at the centre
        voxel. Centrosymmetric by construction.
    """
    _check_grid("rho", rho)
    xp = get_array_module(rho)
    f = fft_module(xp).rfftn(rho, axes=_AXES)
    power = f.real * f.real + f.imag * f.imag
    ac = fft_module(xp).irfftn(power, s=rho.shape, axes=_AXES)
    return xp.fft.fftshift(ac, axes=_AXES).astype(rho.dtype, copy=False)


def intensity_from_autocorrelation(ac: Any) -> Any:
    """Centred 3D intensity of an autocorrelation: ``real(fftshift(fftn(ifftshift(ac))))``.

    Parameters
    ----------
    ac : array, shape (M, M, M), float32 or float64
        Autocorrelation on the centred grid.

    Returns
    -------
    array, shape (M, M, M), dtype of ``ac``
        Intensity on the centred reciprocal grid (spacing ``1 / (M d)``). Even in ``k``
        (real part of the transform of a real array). May be negative where ``ac`` is not
        a true autocorrelation (noise, regularisation).
    """
    _check_grid("ac", ac)
    xp = get_array_module(ac)
    f = xp.fft.fftn(xp.fft.ifftshift(ac, axes=_AXES), axes=_AXES)
    return xp.fft.fftshift(f.real, axes=_AXES).astype(ac.dtype, copy=False)


def amplitudes_from_autocorrelation(ac: Any) -> Any:
    """Target Fourier amplitudes ``sqrt(max(intensity, 0))`` in unshifted FFT order.

    Parameters
    ----------
    ac : array, shape (M, M, M), float32 or float64
        Autocorrelation on the centred grid.

    Returns
    -------
    array, shape (M, M, M), dtype of ``ac``
        ``sqrt(max(real(fftn(ifftshift(ac))), 0))``: index ``k`` is frequency
        ``fftfreq(M)[k]`` cycles per voxel, the layout of ``fftn(rho)``. Negative
        intensities (noise) are clipped to 0.
    """
    _check_grid("ac", ac)
    xp = get_array_module(ac)
    intensity = xp.fft.fftn(xp.fft.ifftshift(ac, axes=_AXES), axes=_AXES).real
    return xp.sqrt(xp.maximum(intensity, 0)).astype(ac.dtype, copy=False)


# ----------------------------------------------------------------------------------------
# Projections and iterations
# ----------------------------------------------------------------------------------------


def _prepare(amp_half: Any, weights: Any, known: Any) -> tuple[Any, ...]:
    """Per-call constants of the fast modulus step.

    Returns ``(amp_k, unknown, sqrt_w, amp_sw)``: the amplitudes with 0 where not measured;
    1.0 where not measured (so that ``amp_k / |F| + unknown`` is the factor applied to F),
    or None; the square root of the weights (full half-spectrum shape) and
    ``amp_half * sqrt_w``, so that the misfit is one subtraction and one BLAS dot.
    """
    xp = get_array_module(amp_half)
    sqrt_w = xp.ascontiguousarray(xp.broadcast_to(xp.sqrt(weights), amp_half.shape))
    amp_sw = amp_half * sqrt_w
    if known is None:
        return amp_half, None, sqrt_w, amp_sw
    return xp.where(known, amp_half, 0), (~known).astype(amp_half.dtype), sqrt_w, amp_sw


def _modulus_step(rho: Any, amp_half: Any, weights: Any, known: Any = None,
                  prepared: tuple[Any, ...] | None = None) -> tuple[Any, Any]:
    """One forward + one inverse FFT: ``(P_M rho, squared weighted Fourier misfit of rho)``.

    ``known`` (half-spectrum bool, or None = everywhere) marks the Fourier coefficients
    that were measured; the others (beyond the detector's reach, behind the beamstop) keep
    their current value, so the support constraint alone decides them. ``weights`` must
    already be zero outside ``known``. The misfit stays a 0-d device array so the loop
    never synchronises with the host. ``prepared`` (from :func:`_prepare`) enables the
    fast host path (fewer passes over the spectrum: F is scaled in place by one factor
    array, no masks or ``where``); it is taken when no ``|F|`` is zero (checked, cheap on
    the host); the result is the same.
    """
    xp = get_array_module(rho)
    fft = fft_module(xp)
    f = fft.rfftn(rho, axes=_AXES)
    mag = xp.abs(f)
    tiny = xp.finfo(mag.dtype).tiny
    if prepared is not None and xp is np and mag.min() > tiny:
        amp_k, unknown, sqrt_w, amp_sw = prepared
        d = mag * sqrt_w
        d -= amp_sw
        d = d.ravel()
        misfit2 = np.dot(d, d)
        np.divide(amp_k, mag, out=mag)
        if unknown is not None:
            mag += unknown  # factor 1: unmeasured coefficients keep their value
        f *= mag
        projected = fft.irfftn(f, s=rho.shape, axes=_AXES)
        return projected.astype(rho.dtype, copy=False), misfit2
    diff = mag - amp_half
    diff *= diff
    diff *= weights
    misfit2 = xp.sum(diff)
    nonzero = mag > tiny
    # Keep the phase of F; where |F| = 0 the phase is undefined: use the amplitude (phase 0).
    mag[~nonzero] = 1  # those coefficients take amp_half below; avoid dividing by ~0
    xp.divide(amp_half, mag, out=mag)
    g = xp.where(nonzero, f * mag, amp_half)
    if known is not None:
        g = xp.where(known, g, f)
    projected = fft.irfftn(g, s=rho.shape, axes=_AXES)
    return projected.astype(rho.dtype, copy=False), misfit2


def fourier_projection(rho: Any, amplitudes: Any) -> Any:
    """Modulus projection ``P_M``: impose the Fourier amplitudes, keep the phases.

    Parameters
    ----------
    rho : array, shape (M, M, M), float32 or float64
        Current density estimate.
    amplitudes : array, shape (M, M, M), real
        Target amplitudes in unshifted FFT order (:func:`amplitudes_from_autocorrelation`),
        obeying Friedel's law ``A(-k) = A(k)``.

    Returns
    -------
    array, shape (M, M, M), dtype of ``rho``
        ``real(ifftn(A * F / |F|))`` with ``F = fftn(rho)``; where ``|F| = 0`` the
        coefficient is ``A`` (zero phase). Idempotent.
    """
    _check_grid("rho", rho)
    _check_same_shape("amplitudes", amplitudes, "rho", rho)
    xp = get_array_module(rho)
    amp_half = _half(amplitudes.astype(rho.dtype, copy=False))
    projected, _ = _modulus_step(rho, amp_half, _half_weights(rho.shape, xp, rho.dtype))
    return projected


def _er_iterations(rho, amp_half, support, weights, n_iter, errors, known=None):
    xp = get_array_module(rho)
    prepared = _prepare(amp_half, weights, known)
    # Support and positivity as two in-place passes (max(pm, 0) * 1_support) instead of
    # boolean temporaries and a where.
    sup = support.astype(rho.dtype)
    for _ in range(n_iter):
        pm, misfit2 = _modulus_step(rho, amp_half, weights, known, prepared)
        errors.append(misfit2)
        xp.maximum(pm, 0, out=pm)
        pm *= sup
        rho = pm
    return rho


def _hio_iterations(rho, amp_half, support, weights, n_iter, beta, errors, known=None):
    xp = get_array_module(rho)
    prepared = _prepare(amp_half, weights, known)
    beta = rho.dtype.type(beta)
    for _ in range(n_iter):
        pm, misfit2 = _modulus_step(rho, amp_half, weights, known, prepared)
        errors.append(misfit2)
        rho = xp.where(support & (pm >= 0), pm, rho - beta * pm)
    return rho


def _check_iterate_args(rho: Any, amplitudes: Any, support: Any, n_iter: int) -> None:
    _check_grid("rho", rho)
    _check_same_shape("amplitudes", amplitudes, "rho", rho)
    _check_same_shape("support", support, "rho", rho)
    if support.dtype != bool:
        raise ValueError(f"support must be a bool array, got dtype {support.dtype}")
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter}")


def error_reduction(rho: Any, amplitudes: Any, support: Any, n_iter: int = 1) -> Any:
    """Error reduction: ``rho <- P_S P_M rho``, ``n_iter`` times.

    ``P_S`` keeps ``max(rho, 0)`` inside the support and sets 0 outside (support and
    positivity constraint).

    Parameters
    ----------
    rho : array, shape (M, M, M), float32 or float64
        Starting density.
    amplitudes : array, shape (M, M, M), real
        Target amplitudes, unshifted FFT order.
    support : array, shape (M, M, M), bool
        Support of the density.
    n_iter : int
        Number of iterations (one FFT pair each), >= 0.

    Returns
    -------
    array, shape (M, M, M), dtype of ``rho``
        New density, >= 0 and 0 outside the support (if ``n_iter >= 1``).
    """
    _check_iterate_args(rho, amplitudes, support, n_iter)
    xp = get_array_module(rho)
    amp_half = _half(amplitudes.astype(rho.dtype, copy=False))
    weights = _half_weights(rho.shape, xp, rho.dtype)
    return _er_iterations(rho, amp_half, support, weights, int(n_iter), [])


def hybrid_input_output(
    rho: Any, amplitudes: Any, support: Any, n_iter: int = 1, beta: float = 0.9
) -> Any:
    """Fienup's hybrid input-output, ``n_iter`` times.

    ``rho <- P_M rho`` where ``rho`` is in the support and ``P_M rho >= 0``, else
    ``rho - beta * P_M rho`` (Fienup, Appl. Opt. 21 (1982) 2758).

    Parameters
    ----------
    rho, amplitudes, support, n_iter
        As for :func:`error_reduction`.
    beta : float
        Feedback parameter, in (0, 1] (typically 0.9).

    Returns
    -------
    array, shape (M, M, M), dtype of ``rho``
        New iterate (not constrained: may be negative and non-zero outside the support;
        follow with ER).
    """
    _check_iterate_args(rho, amplitudes, support, n_iter)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    xp = get_array_module(rho)
    amp_half = _half(amplitudes.astype(rho.dtype, copy=False))
    weights = _half_weights(rho.shape, xp, rho.dtype)
    return _hio_iterations(rho, amp_half, support, weights, int(n_iter), beta, [])


def fourier_error(rho: Any, amplitudes: Any) -> float:
    """Relative Fourier misfit ``|| |F(rho)| - A || / ||A||`` over the full grid.

    Parameters
    ----------
    rho : array, shape (M, M, M), real
        Density.
    amplitudes : array, shape (M, M, M), real
        Target amplitudes, unshifted FFT order.

    Returns
    -------
    float
        The relative error (0 for a perfect fit; ``inf`` if ``A`` is all zero and the fit
        is not).
    """
    _check_grid("rho", rho)
    _check_same_shape("amplitudes", amplitudes, "rho", rho)
    xp = get_array_module(rho)
    mag = xp.abs(xp.fft.fftn(rho, axes=_AXES))
    num = float(xp.linalg.norm((mag - amplitudes).ravel()))
    den = float(xp.linalg.norm(amplitudes.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


# ----------------------------------------------------------------------------------------
# Supports
# ----------------------------------------------------------------------------------------


def gaussian_blur(x: Any, sigma: float) -> Any:
    """Circular Gaussian blur by multiplication in Fourier space (works on GPU arrays).

    Parameters
    ----------
    x : array, shape (M, M, M), float32 or float64
        Input.
    sigma : float
        Standard deviation of the Gaussian in voxels, >= 0 (0 returns a copy).

    Returns
    -------
    array, shape (M, M, M), dtype of ``x``
        ``x`` convolved (periodically) with a unit-sum Gaussian; the transfer function is
        ``exp(-2 pi^2 sigma^2 |f|^2)``, ``f`` in cycles per voxel.
    """
    _check_grid("x", x)
    if not sigma >= 0.0:
        raise ValueError(f"sigma must be >= 0 voxels, got {sigma}")
    xp = get_array_module(x)
    if sigma == 0.0:
        return x.copy()
    f = fft_module(xp).rfftn(x, axes=_AXES)
    n0, n1, n2 = x.shape
    c = -2.0 * (xp.pi * sigma) ** 2
    g0 = xp.exp(c * xp.fft.fftfreq(n0) ** 2).astype(x.dtype)
    g1 = xp.exp(c * xp.fft.fftfreq(n1) ** 2).astype(x.dtype)
    g2 = xp.exp(c * xp.fft.rfftfreq(n2) ** 2).astype(x.dtype)
    f *= g0[:, None, None] * g1[None, :, None] * g2[None, None, :]
    return fft_module(xp).irfftn(f, s=x.shape, axes=_AXES).astype(x.dtype, copy=False)


def _shrinkwrap_device(rho, support, sigma, threshold, mode):
    """Shrinkwrap without host synchronisation: ``(new support, was-empty 0-d bool)``."""
    xp = get_array_module(rho)
    blurred = gaussian_blur(xp.abs(rho), sigma)
    if mode == "max":
        level = threshold * xp.max(blurred)
    else:
        level = threshold * xp.std(blurred)
    new = blurred > level
    empty = ~xp.any(new)
    return xp.where(empty, support, new), empty


def _check_shrinkwrap_args(sigma: float, threshold: float, mode: str) -> None:
    if mode not in SHRINKWRAP_MODES:
        raise ValueError(f"shrinkwrap mode must be one of {SHRINKWRAP_MODES}, got {mode!r}")
    if not sigma >= 0.0:
        raise ValueError(f"shrinkwrap sigma must be >= 0 voxels, got {sigma}")
    if not threshold >= 0.0:
        raise ValueError(f"shrinkwrap threshold must be >= 0, got {threshold}")
    if mode == "max" and not threshold < 1.0:
        raise ValueError(
            f"shrinkwrap threshold (fraction of the maximum) must be < 1, got {threshold}"
        )


def shrinkwrap(
    rho: Any, support: Any, sigma: float = 1.0, threshold: float = 0.15, mode: str = "max"
) -> Any:
    """Shrinkwrap support update (Marchesini et al., Phys. Rev. B 68 (2003) 140101).

    The support becomes the voxels where ``|rho|`` blurred by a Gaussian of ``sigma``
    voxels exceeds a level:

    * ``mode="max"`` (default): ``threshold * max(blurred)``, ``threshold`` a fraction in
      ``[0, 1)``; 0.1-0.2 keeps the blob of a compact object with a margin of about
      ``sigma`` voxels;
    * ``mode="std"``: ``threshold * std(blurred)`` over the whole grid (how the original
      SpiniFEL set it); the support then scales with the spread of the density.

    Parameters
    ----------
    rho : array, shape (M, M, M), float32 or float64
        Current density (after ER, so >= 0; the absolute value is used).
    support : array, shape (M, M, M), bool
        Current support, kept if the new one would be empty.
    sigma : float
        Gaussian standard deviation in voxels, >= 0.
    threshold : float
        See ``mode``.
    mode : {"max", "std"}
        How the level is derived.

    Returns
    -------
    array, shape (M, M, M), bool
        The new support, never empty unless ``support`` was (a warning is issued when the
        previous support is kept).
    """
    _check_grid("rho", rho)
    _check_same_shape("support", support, "rho", rho)
    _check_shrinkwrap_args(sigma, threshold, mode)
    new, empty = _shrinkwrap_device(rho, support, sigma, threshold, mode)
    if bool(empty):
        warnings.warn(
            "shrinkwrap produced an empty support (density all zero?); "
            "keeping the previous support",
            RuntimeWarning,
            stacklevel=2,
        )
    return new


def support_from_autocorrelation(ac: Any, fraction: float = 0.01, scale: float = 0.6) -> Any:
    """Initial density support from the autocorrelation.

    The autocorrelation is supported on the difference set ``S - S`` of the density's
    support ``S``, which for a centrosymmetric convex ``S`` is ``S`` scaled by 2. The
    support of the autocorrelation (voxels above ``fraction`` of its maximum) is therefore
    scaled by ``scale`` about the centre (nearest-voxel sampling). The default 0.6 rather
    than the ideal 0.5 leaves a margin: the level cuts the thin tails of the
    autocorrelation (for a uniform ball of radius R the 1% level is at about 1.83 R, so
    0.6 gives 1.1 R), and non-centrosymmetric objects do not fit in half their difference
    set. A loose support is harmless (shrinkwrap tightens it), a tight one loses density.
    ``scale=1`` keeps the whole autocorrelation support (as the original SpiniFEL did).

    Parameters
    ----------
    ac : array, shape (M, M, M), float32 or float64
        Autocorrelation on the centred grid.
    fraction : float
        Level as a fraction of ``max(ac)``, in ``[0, 1)`` (default 1%).
    scale : float
        Linear scale factor in ``(0, 1]``.

    Returns
    -------
    array, shape (M, M, M), bool
        The support, centred on the centre voxel; never empty (the centre voxel is always
        included, being the autocorrelation's maximum for a true autocorrelation).
    """
    _check_grid("ac", ac)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"support fraction must be in [0, 1), got {fraction}")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"support scale must be in (0, 1], got {scale}")
    xp = get_array_module(ac)
    mask = ac > fraction * xp.max(ac)
    # Voxel l of the result takes the mask at the centre + (l - centre) / scale.
    index = []
    inside = []
    for n in ac.shape:
        c = (n - 1) // 2
        src = xp.rint((xp.arange(n) - c) / scale).astype(xp.int64) + c
        inside.append((src >= 0) & (src < n))
        index.append(xp.clip(src, 0, n - 1))
    out = mask[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
    out &= inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    centre = tuple((n - 1) // 2 for n in ac.shape)
    out[centre] = True
    return out
