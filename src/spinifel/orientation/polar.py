"""Polar orientation search: every in-plane rotation of a beam direction by one FFT.

A rotation ``Rz(psi)`` about the beam axis ``z`` maps the detector's Ewald sphere onto
itself. With the convention of :mod:`spinifel.geometry.orientations` (the image of
orientation ``R`` samples the intensity at ``R @ s_pixel``), the slice at ``R @ Rz(psi)``
samples ``R @ Rz(psi) @ s``: it is the slice at ``R`` with the detector plane rotated by
``psi``. So the orientation grid is factorised as

    ``q(d, m) = q_d * q_z(2 pi m / n_psi)``, index ``d * n_psi + m``,

with ``q_d`` the rotation taking ``e_z`` to the beam direction ``d`` (a Fibonacci sphere
of ``n_dir`` points; ``R(q(d, m)) e_z = d``) and ``n_psi`` uniform in-plane angles. Haar
measure on SO(3) is the product of the uniform measures on the sphere and on the circle, so
the factorised grid is near-uniform.

Polar grid (:class:`PolarGrid`). Rings of ``|s|`` from the beam outwards, grouped in
annuli; the rings of an annulus carry ``N`` azimuths ``phi_j = 2 pi j / N`` with ``N`` a
multiple ``L`` of ``n_psi``. Each pixel reads the polar slice through weights ``W``
(bilinear in ``(|s|, phi)``, or its nearest bin for photon counts). The model slice of
direction ``d`` is evaluated once at the bin centres on the Ewald sphere; the slice of
``q(d, m)`` at bin ``(k, j)`` is that slice at ``(k, j + m L)``.

Score. With ``S = W^T x`` (the image spread onto the bins) and ``G = W^T W`` (the
interpolation's Gram matrix, a few bin offsets ``e``), the distance of image ``x`` to the
interpolated slice ``y`` of ``q(d, m)`` scaled by ``c`` is exactly

    ``||x||^2 - 2 c X(d, m) + c^2 Y(d, m)``,
    ``X(d, m) = sum_b S(b) y_d(b + mL)``,
    ``Y(d, m) = sum_e sum_b G_e(b) y_d(b + mL) y_d(b + e + mL)``:

circular cross-correlations along the angle, summed over rings. Per angular frequency
``f`` the sum over rings of ``conj(S^(f)) y^(f)`` is one complex GEMM
``(images x rings) @ (rings x directions)``; the frequencies of all annuli, folded modulo
``n_psi``, give every in-plane angle by one inverse FFT of length ``n_psi``
(:func:`fold_to_psi`). ``||x||^2`` is the pixel norm, so distances are those of
:func:`spinifel.orientation.matching.match_orientations` with interpolated slices. Each
image's best few are then rescored with exact slices (:func:`rescore`). The Poisson score
goes through the same correlations (:func:`score_polar`).

Everything follows the array module of the images where it can (numpy is what is tested;
the solver runs it on the host); no MPI (:func:`match_polar_distributed` takes a
communicator and calls :mod:`spinifel.parallel.collectives`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from spinifel.backend.arrays import get_array_module, to_module
from spinifel.geometry.orientations import canonical, grid_spacing, multiply, normalize
from spinifel.orientation.matching import MatchState, _fold, apply_transform

_GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))


def smooth_size(n: int) -> int:
    """Smallest integer ``>= n`` whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def fibonacci_directions(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors on the sphere (Fibonacci lattice), ``(n, 3)`` float64.

    ``z_i = 1 - (2 i + 1) / n`` and azimuth ``i`` times the golden angle; no point is a
    pole, so :func:`direction_quaternions` is regular everywhere.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 directions, got {n}")
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    rho = np.sqrt(np.maximum(1.0 - z * z, 0.0))
    phi = _GOLDEN_ANGLE * i
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=-1)


def direction_quaternions(directions: np.ndarray) -> np.ndarray:
    """Quaternions of the shortest rotations taking ``e_z`` to each direction.

    Parameters
    ----------
    directions : ndarray, shape (n, 3)
        Unit vectors ``d`` with ``d_z > -1``.

    Returns
    -------
    ndarray, shape (n, 4), float64
        ``q_d`` with ``R(q_d) @ e_z = d`` (axis ``e_z x d``, angle ``acos(d_z)``).
    """
    d = np.asarray(directions, dtype=np.float64)
    q = np.stack([1.0 + d[:, 2], -d[:, 1], d[:, 0], np.zeros(len(d))], axis=-1)
    return normalize(q)


def psi_quaternions(n_psi: int) -> np.ndarray:
    """Rotations about ``z`` by ``2 pi m / n_psi``, ``m = 0 .. n_psi - 1``: ``(n_psi, 4)``."""
    half = np.pi * np.arange(n_psi) / n_psi
    return np.stack([np.cos(half), np.zeros(n_psi), np.zeros(n_psi), np.sin(half)], axis=-1)


def polar_sizes(n_orientations: int, n_psi: int = 0) -> tuple[int, int]:
    """Beam directions and in-plane angles of a factorised grid of about ``n_orientations``.

    ``n_psi = 0`` chooses the in-plane step equal to the SO(3) spacing of
    ``n_orientations`` near-uniform rotations, ``2 pi / n_psi ~ grid_spacing``, rounded up
    to an FFT-friendly length; ``n_dir = round(n_orientations / n_psi)``, which makes the
    direction spacing ``sqrt(4 pi / n_dir)`` about the same angle.

    Returns
    -------
    (n_dir, n_psi) : tuple of int
    """
    if n_psi == 0:
        n_psi = smooth_size(int(np.ceil(2.0 * np.pi / grid_spacing(n_orientations) - 0.5)))
    n_psi = max(int(n_psi), 1)
    return max(int(round(n_orientations / n_psi)), 1), n_psi


def polar_orientation_grid(n_dir: int, n_psi: int) -> np.ndarray:
    """The factorised grid ``q_d * q_z(2 pi m / n_psi)``, index ``d * n_psi + m``.

    Returns
    -------
    ndarray, shape (n_dir * n_psi, 4), float64
        Canonical unit quaternions.
    """
    qd = direction_quaternions(fibonacci_directions(n_dir))
    return canonical(multiply(qd[:, None, :], psi_quaternions(n_psi)[None, :, :]).reshape(-1, 4))


@dataclass(frozen=True)
class Annulus:
    """Consecutive rings sharing one angular sampling, and the pixels between them.

    Attributes
    ----------
    radii : ndarray (K,) float64
        ``|s|`` of the rings, inverse metres (uniformly spaced).
    n_angles : int
        Azimuths ``phi_j = 2 pi j / n_angles`` per ring, a multiple ``step`` of ``n_psi``.
    pixels : ndarray (Q,) int64
        Indices (into the grid's pixels) of the pixels read from these rings.
    bins : ndarray (Q, J) int64
        Flat bins ``ring * n_angles + angle`` (local ring index) of each pixel (J = 1 for
        ``"nearest"``, 4 for ``"linear"``).
    weights : ndarray (Q, J) float64
        Their weights (sum 1 per pixel): a pixel reads ``sum_J weight * slice[bin]``.
    counts : ndarray (K, n_angles) float64
        Sum of the weights per bin (pixels per bin for ``"nearest"``).
    gram : tuple of (dk, dj, factor, ndarray (K, n_angles))
        The Gram matrix ``W^T W`` of the interpolation by bin offset: the squared norm over
        these pixels of an interpolated slice ``y`` is
        ``sum factor sum_kj G(k, j) y(k, j) y(k + dk, j + dj)`` (offsets ``e`` and ``-e``
        merged: factor 2).
    """

    radii: np.ndarray
    n_angles: int
    pixels: np.ndarray
    bins: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    gram: tuple

    @property
    def n_rings(self) -> int:
        return len(self.radii)

    def matrix(self):
        """The interpolation as a scipy CSR matrix ``(Q, n_rings * n_angles)``."""
        from scipy.sparse import csr_matrix

        Q, J = self.bins.shape
        return csr_matrix((self.weights.ravel(), self.bins.ravel(), np.arange(0, Q * J + 1, J)),
                          shape=(Q, self.n_rings * self.n_angles))


@dataclass(frozen=True)
class PolarGrid:
    """Polar sampling of a set of pixels: annuli of rings, each with its own azimuths.

    Attributes
    ----------
    n_psi : int
        In-plane angles searched; every annulus's ``n_angles`` is a multiple of it.
    wavelength : float
        Metres; the bin centres lie on the Ewald sphere ``s_z = -wavelength |s|^2 / 2``.
    annuli : tuple of Annulus
        From the beam outwards; consecutive annuli share their boundary ring (sampled at
        each one's azimuths), so each pixel reads from one annulus only.
    n_pixels : int
    """

    n_psi: int
    wavelength: float
    annuli: tuple
    n_pixels: int

    @property
    def n_points(self) -> int:
        """Polar sample points per model slice."""
        return sum(a.n_rings * a.n_angles for a in self.annuli)

    @property
    def n_freq(self) -> int:
        """Largest number of real-FFT frequencies of an annulus."""
        return max(a.n_angles // 2 + 1 for a in self.annuli)

    def matrix(self):
        """The interpolation of all annuli, ``(n_pixels, n_points)`` CSR (tests)."""
        from scipy.sparse import block_diag

        blocks = block_diag([a.matrix() for a in self.annuli]).tocsr()
        order = np.concatenate([a.pixels for a in self.annuli])
        out = blocks[np.argsort(order, kind="stable")]
        return out


def pixel_spacing(positions: np.ndarray, outer: float = 0.9) -> float:
    """Median nearest-neighbour distance of the pixels beyond ``outer`` of the largest ``|s|``
    (inverse metres): the pixel size at the outer radius."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, dtype=np.float64).T
    s = np.linalg.norm(pos, axis=1)
    d, _ = cKDTree(pos).query(pos[s >= outer * s.max()], k=2)
    return float(np.median(d[:, 1]))


def _interpolation(ring_pos: np.ndarray, ang_pos: np.ndarray, n_rings: int, n_angles: int,
                   interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Bins ``(Q, J)`` and weights of pixels at fractional ring/angle coordinates."""
    if interpolation == "nearest":
        k = np.minimum(np.rint(ring_pos).astype(np.int64), n_rings - 1)
        j = np.rint(ang_pos).astype(np.int64) % n_angles
        return (k * n_angles + j)[:, None], np.ones((len(k), 1))
    if interpolation != "linear":
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    k0 = np.clip(np.floor(ring_pos).astype(np.int64), 0, max(n_rings - 2, 0))
    a = np.clip(ring_pos - k0, 0.0, 1.0)
    j0 = np.floor(ang_pos).astype(np.int64)
    b = ang_pos - j0
    k1 = np.minimum(k0 + 1, n_rings - 1)
    j1 = (j0 + 1) % n_angles
    j0 = j0 % n_angles
    bins = np.stack([k0 * n_angles + j0, k0 * n_angles + j1, k1 * n_angles + j0,
                     k1 * n_angles + j1], axis=1)
    w = np.stack([(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b], axis=1)
    return bins, w


def _gram_maps(mat, n_rings: int, n_angles: int) -> tuple:
    """``W^T W`` of an annulus's interpolation matrix grouped by bin offset."""
    g = (mat.T @ mat).tocoo()
    k, j = np.divmod(g.row, n_angles)
    k2, j2 = np.divmod(g.col, n_angles)
    dk = k2 - k
    dj = (j2 - j + n_angles // 2) % n_angles - n_angles // 2
    keep = (dk > 0) | ((dk == 0) & (dj >= 0))  # e and -e give the same sum
    out = []
    for e in sorted(set(zip(dk[keep].tolist(), dj[keep].tolist()))):
        sel = keep & (dk == e[0]) & (dj == e[1])
        m = np.zeros(n_rings * n_angles)
        np.add.at(m, g.row[sel], g.data[sel])
        out.append((int(e[0]), int(e[1]), 1.0 if e == (0, 0) else 2.0,
                    m.reshape(n_rings, n_angles)))
    return tuple(out)


def _ladder(n: int) -> int:
    """Smallest of 8, 12, 16, 24, 32, 48, ... (``2^a`` and ``3 * 2^a``) that is ``>= n``."""
    m = 8
    while m < n:
        m = m * 3 // 2 if m & (m - 1) == 0 else m * 4 // 3
    return m


def _annulus_groups(radii: np.ndarray, h: float, n_psi: int, angle_oversample: float,
                    n_angles: int, exact_shifts: bool) -> list[tuple[int, int, int]]:
    """``(first ring, last ring, n_angles)`` of each annulus (last ring shared with the next).

    Ring ``k`` needs ``2 pi r_k / n_angles <= h / angle_oversample``. With
    ``exact_shifts`` the counts are FFT-friendly multiples of ``n_psi``; otherwise they come
    from the ladder 8, 12, 16, 24, 32, ... (:func:`_ladder`; fewer points near the beam).
    Rings with the same count form one annulus. ``n_angles > 0``: one annulus.
    """
    n = len(radii)
    if n_angles > 0:
        return [(0, n - 1, max(int(np.ceil(n_angles / n_psi)), 1) * n_psi)]
    need = 2.0 * np.pi * radii * angle_oversample / h
    if exact_shifts:
        sizes = [smooth_size(int(np.ceil(x / n_psi))) * n_psi for x in need]
    else:
        sizes = [_ladder(int(np.ceil(x))) for x in need]
    size = np.maximum.accumulate(np.array(sizes, dtype=np.int64))
    groups = []
    start = 0
    for k in range(1, n):
        if size[k] != size[start] and k < n - 1:
            groups.append((start, k, int(size[k - 1])))
            start = k
    groups.append((start, n - 1, int(size[-1])))
    return groups


def make_polar_grid(positions: np.ndarray, n_psi: int, n_rings: int = 0, n_angles: int = 0,
                    interpolation: str = "linear", ring_oversample: float = 1.0,
                    angle_oversample: float = 0.5, exact_shifts: bool = True) -> PolarGrid:
    """Polar sampling of the pixels at ``positions``.

    Parameters
    ----------
    positions : ndarray, shape (3, P)
        Reciprocal positions of the (good, matched) pixels, inverse metres, on an Ewald
        sphere about the beam axis ``z``.
    n_psi : int
        In-plane angles searched.
    n_rings : int
        Rings from the beam (ring 0) to the largest ``|s|``; 0 = auto, ``h /
        ring_oversample`` apart with ``h`` the pixel size at the outer radius
        (:func:`pixel_spacing`).
    n_angles : int
        0 = auto: each ring's azimuths at most ``h / angle_oversample`` apart (annuli of
        rings with the same count, :func:`_annulus_groups`). > 0: every ring gets this many
        (rounded up to a multiple of ``n_psi``).
    interpolation : {"linear", "nearest"}
        How a pixel reads the polar slice: bilinear in ``(|s|, phi)`` between its 4
        surrounding bin centres (Euclidean score: the cross term is exactly that of the
        interpolated slice), or its nearest bin only (each photon in one bin: binned
        counts stay Poisson).
    ring_oversample, angle_oversample : float
        Sampling of the polar grid relative to the outer pixel size. The defaults (rings
        one pixel apart, azimuths two) are meant for screening followed by exact rescoring
        of each image's best few (measured against finer samplings in docs/algorithm.md).
    exact_shifts : bool
        True (default): every annulus's azimuth count is a multiple of ``n_psi``, so each
        in-plane angle is a whole number of bins and the polar score is exactly the
        distance to the slice interpolated at the pixels. False: counts from a ladder
        8, 12, 16, 24, ... (fewer points near the beam); the score between bins is then
        the trigonometric interpolation of the per-ring correlations, an approximation
        that agreed less often with exhaustive search in trials, so it is not the default.
    """
    pos = np.asarray(to_module(positions, np), dtype=np.float64)
    s = np.linalg.norm(pos, axis=0)
    s_max = float(s.max())
    h = pixel_spacing(pos) if (n_rings == 0 or n_angles == 0) else 0.0
    n_rings = max(int(n_rings or np.ceil(s_max / h * ring_oversample) + 1), 2)
    radii = np.linspace(0.0, s_max, n_rings)
    t = s / s_max * (n_rings - 1)
    phi = np.arctan2(pos[1], pos[0]) % (2.0 * np.pi)
    groups = _annulus_groups(radii, h, n_psi, angle_oversample, n_angles, exact_shifts)
    first = np.array([g[0] for g in groups])
    which = np.searchsorted(first, np.minimum(np.floor(t), n_rings - 2), side="right") - 1
    annuli = []
    for c, (a, b, na) in enumerate(groups):
        pix = np.flatnonzero(which == c)
        bins, w = _interpolation(t[pix] - a, phi[pix] / (2.0 * np.pi) * na, b - a + 1, na,
                                 interpolation)
        counts = np.bincount(bins.ravel(), w.ravel(), (b - a + 1) * na).reshape(b - a + 1, na)
        ann = Annulus(radii[a:b + 1], na, pix, bins, w, counts, ())
        annuli.append(Annulus(**{**ann.__dict__,
                                 "gram": _gram_maps(ann.matrix(), b - a + 1, na)}))
    return PolarGrid(int(n_psi), _ewald_wavelength(pos, s), tuple(annuli), pos.shape[1])


def _ewald_wavelength(pos: np.ndarray, s: np.ndarray) -> float:
    """Least-squares ``lambda`` of the Ewald sphere ``s_z = -lambda |s|^2 / 2`` (0: flat)."""
    s4 = float(np.sum(s**4))
    return -2.0 * float(np.sum(pos[2] * s * s)) / s4 if s4 > 0 else 0.0


def polar_points(grid: PolarGrid) -> np.ndarray:
    """Reciprocal positions of the bin centres, ``(3, n_points)`` float64.

    Annulus by annulus, ring-major: ring ``r`` at azimuth ``phi_j = 2 pi j / n_angles`` on
    the Ewald sphere, ``s_z = -lambda r^2 / 2``, ``s_perp = sqrt(r^2 - s_z^2)``.
    """
    out = []
    for a in grid.annuli:
        r = a.radii
        sz = -0.5 * grid.wavelength * r * r
        sp = np.sqrt(np.maximum(r * r - sz * sz, 0.0))
        phi = 2.0 * np.pi * np.arange(a.n_angles) / a.n_angles
        x = sp[:, None] * np.cos(phi)[None, :]
        y = sp[:, None] * np.sin(phi)[None, :]
        out.append(np.stack([x.ravel(), y.ravel(), np.repeat(sz, a.n_angles)]))
    return np.concatenate(out, axis=1)


def split_slices(flat: Any, grid: PolarGrid) -> list:
    """Views ``(B, n_rings, n_angles)`` per annulus of polar slices ``(B, n_points)``."""
    out, start = [], 0
    for a in grid.annuli:
        size = a.n_rings * a.n_angles
        out.append(flat[:, start:start + size].reshape(-1, a.n_rings, a.n_angles))
        start += size
    return out


def bin_images(images: Any, annulus: Annulus) -> Any:
    """The pixel values of ``images`` spread onto one annulus's bins with its weights.

    Parameters
    ----------
    images : array, shape (n, P)
        Values at all pixels of the grid (numpy or cupy).

    Returns
    -------
    array, shape (n, n_rings, n_angles), float64
        ``S_i(b) = sum_p w_pb x_ip`` (bin sums for ``"nearest"``).
    """
    xp = get_array_module(images)
    n = images.shape[0]
    if xp is np:
        x = np.asarray(images, dtype=np.float64)[:, annulus.pixels]
        out = np.asarray((annulus.matrix().T @ x.T).T)
    else:  # pragma: no cover - device path
        out = xp.zeros((n, annulus.n_rings * annulus.n_angles), dtype=np.float64)
        x = images[:, to_module(annulus.pixels, xp)].astype(np.float64)
        for c in range(annulus.bins.shape[1]):
            w = to_module(annulus.weights[:, c], xp)
            xp.add.at(out, (slice(None), to_module(annulus.bins[:, c], xp)), x * w)
    return out.reshape(n, annulus.n_rings, annulus.n_angles)


class PolarSlicer:
    """Model slices of one autocorrelation on the polar bin centres, per beam direction.

    Parameters
    ----------
    autocorrelation : array, shape (M, M, M), real
    grid : PolarGrid
    reciprocal_extent : float
        Inverse metres (as :class:`~spinifel.orientation.slicing.Slicer`).
    eps, dtype, nthreads
        NUFFT tolerance, precision and threads.
    """

    def __init__(self, autocorrelation: Any, grid: PolarGrid, reciprocal_extent: float,
                 eps: float = 1e-4, dtype=np.float32, nthreads: int = 1):
        from spinifel.orientation.slicing import Slicer

        self.grid = grid
        pts = to_module(polar_points(grid), get_array_module(autocorrelation))
        self._slicer = Slicer(autocorrelation, pts, reciprocal_extent, eps, dtype, nthreads)

    def slices(self, direction_quaternions: np.ndarray) -> Any:
        """Polar slices ``(B, n_points)`` of directions ``q_d`` ``(B, 4)`` (annulus-major,
        :func:`split_slices`)."""
        return self._slicer.slices(direction_quaternions)

    def iter_batches(self, direction_quaternions: np.ndarray, batch: int
                     ) -> Iterator[tuple[int, Any]]:
        """Yield ``(first direction, slices)`` for batches of at most ``batch`` directions."""
        for a in range(0, len(direction_quaternions), batch):
            yield a, self.slices(direction_quaternions[a:a + batch])


def _freq_weights(n_angles: int, xp: Any = np) -> Any:
    """``w_f / n_angles`` of the real-FFT frequencies ``f = 0 .. n_angles // 2``: the
    inverse real FFT at shift ``t`` is ``Re sum_f (w_f / N) C_f exp(2 pi i f t / N)``."""
    w = np.full(n_angles // 2 + 1, 2.0 / n_angles)
    w[0] = 1.0 / n_angles
    if n_angles % 2 == 0:
        w[-1] = 1.0 / n_angles
    return to_module(w, xp)


def fold_to_psi(spectrum: Any, n_psi: int, last: bool = False) -> Any:
    """Real signal at the ``n_psi`` in-plane shifts from weighted frequency sums.

    Parameters
    ----------
    spectrum : array, shape (F, ...) complex
        ``G(f) = sum_annuli (w_f / N) C(f)`` (frequencies of every annulus, zero beyond an
        annulus's own).
    last : bool
        Put the shift axis last (the fold then also does the transpose).

    Returns
    -------
    array, shape (n_psi, ...) real, or (..., n_psi) with ``last``
        ``c(m) = Re sum_f G(f) exp(2 pi i f m / n_psi)``: frequencies folded modulo
        ``n_psi``, then one inverse FFT of length ``n_psi``.
    """
    xp = get_array_module(spectrum)
    F = spectrum.shape[0]
    view = (lambda a: xp.moveaxis(a, -1, 0)) if last else (lambda a: a)
    shape = (spectrum.shape[1:] + (n_psi,)) if last else ((n_psi,) + spectrum.shape[1:])
    folded = xp.zeros(shape, dtype=spectrum.dtype) if F < n_psi else xp.empty(shape,
                                                                              dtype=spectrum.dtype)
    out = view(folded)
    out[:min(F, n_psi)] = spectrum[:n_psi]
    for a in range(n_psi, F, n_psi):
        out[:min(F - a, n_psi)] += spectrum[a:a + n_psi]
    axis = -1 if last else 0
    if xp is np:
        import scipy.fft

        return scipy.fft.ifft(folded, axis=axis, norm="forward", overwrite_x=True).real
    return xp.fft.ifft(folded, axis=axis, norm="forward").real


@dataclass
class PolarImages:
    """Images prepared once for the polar search.

    Attributes
    ----------
    spectra : list of array (F_c, n, K_c) complex
        Per annulus: conjugated angular spectra of the spread images, frequency-major (GEMM
        operands), times ``w_f / N_c`` (:func:`_freq_weights`).
    image_sq : array (n,) float64
        ``||x||^2`` over the pixels (after the transform).
    """

    spectra: list
    image_sq: Any


def prepare_images(images: Any, grid: PolarGrid, transform: str = "none",
                   dtype=np.float32) -> PolarImages:
    """Spread ``images`` ``(n, P)`` (after ``transform``) onto the annuli and FFT each ring
    along the angle. ``dtype`` (float32 or float64) sets the precision of the GEMMs."""
    xp = get_array_module(images)
    x = apply_transform(images, transform)
    sq = xp.einsum("np,np->n", x, x, dtype=np.float64)
    cdtype = np.result_type(dtype, np.complex64)
    spectra = []
    for a in grid.annuli:
        spec = xp.fft.rfft(bin_images(x, a), axis=2) * _freq_weights(a.n_angles, xp)
        spectra.append(xp.ascontiguousarray(xp.conj(spec).transpose(2, 0, 1), dtype=cdtype))
    return PolarImages(spectra, sq)


def slice_terms(slices: Any, grid: PolarGrid, transform: str = "none",
                dtype=np.float32) -> tuple[list, Any]:
    """GEMM operands and norms of one batch of polar slices.

    Parameters
    ----------
    slices : array, shape (B, n_points)
        Untransformed polar model slices of ``B`` directions (:class:`PolarSlicer`).

    Returns
    -------
    spectra : list of array (F_c, K_c, B) complex
        Per annulus: angular spectra of the transformed slices.
    norms : array (B, n_psi) float64
        Squared norms over the pixels of the interpolated slices at every in-plane angle,
        ``sum factor sum_kj G(k, j) y_d(k, j + mL) y_d(k + dk, j + dj + mL)``.
    """
    xp = get_array_module(slices)
    y_all = apply_transform(slices, transform).astype(dtype)
    cdtype = np.result_type(dtype, np.complex64)
    spectra = []
    norm_spec = xp.zeros((grid.n_freq, y_all.shape[0]), dtype=np.complex128)
    for a, y in zip(grid.annuli, split_slices(y_all, grid)):
        spec = xp.fft.rfft(y, axis=2)  # (B, K, F)
        spectra.append(xp.ascontiguousarray(spec.transpose(2, 1, 0), dtype=cdtype))
        wf = _freq_weights(a.n_angles, xp)
        for dk, dj, factor, g in a.gram:
            other = xp.zeros_like(y)
            other[:, :a.n_rings - dk] = xp.roll(y[:, dk:], -dj, axis=2)
            gspec = xp.conj(xp.fft.rfft(to_module(g, xp), axis=1)) * (factor * wf)
            prod = xp.fft.rfft(y * other, axis=2)
            norm_spec[:len(wf)] += xp.einsum("kf,bkf->fb", gspec, prod)
    return spectra, fold_to_psi(norm_spec, grid.n_psi).T


def correlate(image_spectra: list, slice_spectra: list, grid: PolarGrid) -> Any:
    """``X(i, d, m) = sum_p x_ip y_(d, m)(p)`` for every image, direction and in-plane angle.

    Parameters
    ----------
    image_spectra : list of array (F_c, n, K_c) complex
        From :func:`prepare_images`.
    slice_spectra : list of array (F_c, K_c, B) complex
        From :func:`slice_terms`.

    Returns
    -------
    array, shape (n, B, n_psi), real (float32 for complex64 operands)
    """
    xp = get_array_module(image_spectra[0], slice_spectra[0])
    # one complex GEMM (n x K_c) @ (K_c x B) per frequency and annulus; the annulus with
    # the most frequencies (the last) writes the sum, the others add to its low frequencies
    acc = xp.matmul(image_spectra[-1], slice_spectra[-1])
    for a_spec, s_spec in zip(image_spectra[:-1], slice_spectra[:-1]):
        acc[:a_spec.shape[0]] += xp.matmul(a_spec, s_spec)
    return fold_to_psi(acc, grid.n_psi, last=True)


def _batch_best(images: PolarImages, spec: list, ysq: Any, a: int, b: int, grid: PolarGrid,
                scale_per_image: bool, k: int) -> tuple[Any, Any, Any]:
    """The ``k`` nearest slices of images ``a:b`` within one batch of polar slices.

    Columns are in grid order ``d * n_psi + m``. The ranking is done in the correlation's
    precision (``||y||^2 - 2 x.y``, or ``-max(x.y, 0)^2 / ||y||^2`` with
    ``scale_per_image``); the chosen entries' distances and scales are then evaluated in
    float64 as :func:`spinifel.orientation.matching.update_matches` does.

    Returns
    -------
    (column (n, k) int64, distance (n, k) float64, scale (n, k) float64)
    """
    xp = get_array_module(ysq)
    cross = correlate([s[:, a:b] for s in images.spectra], spec, grid).reshape(b - a, -1)
    y32 = ysq.astype(cross.dtype)
    if scale_per_image:
        inv = xp.where(y32 > 0, 1 / xp.where(y32 > 0, y32, 1), 0).astype(cross.dtype)
        score = xp.maximum(cross, 0)
        score *= score
        score *= -inv
    else:
        score = y32[None, :] - 2 * cross
    rows = xp.arange(b - a)[:, None]
    if k <= 4:  # k passes of argmin beat a partition for the few candidates kept
        col = xp.empty((b - a, k), dtype=np.int64)
        for j in range(k):
            col[:, j] = xp.argmin(score, axis=1)
            if j < k - 1:
                score[rows[:, 0], col[:, j]] = np.inf
    else:
        col = xp.argpartition(score, k - 1, axis=1)[:, :k]
    c = cross[rows, col].astype(np.float64)
    yy = ysq[col]
    if scale_per_image:
        pos = xp.maximum(c, 0)
        den = xp.where(yy > 0, yy, 1)
        return col, images.image_sq[a:b, None] - xp.where(yy > 0, pos * pos / den, 0), \
            xp.where(yy > 0, pos / den, 0)
    return col, images.image_sq[a:b, None] + yy - 2 * c, xp.ones_like(c)


def update_polar_matches(state: MatchState, images: PolarImages, slices: Any, offset: int,
                         grid: PolarGrid, scale_per_image: bool = False,
                         transform: str = "none", image_batch: int = 1024) -> None:
    """Fold one batch of polar slices (directions ``offset ..``) into the running best match.

    Same distances and tie rule (lower grid index) as
    :func:`spinifel.orientation.matching.update_matches`, with the model slices
    interpolated from the polar grid; the grid index is ``d * n_psi + m``.
    """
    dtype = np.float32 if images.spectra[0].dtype == np.complex64 else np.float64
    spec, norms = slice_terms(slices, grid, transform, dtype)
    ysq = norms.reshape(-1)
    n = images.spectra[0].shape[1]
    for a in range(0, n, image_batch):
        b = min(a + image_batch, n)
        col, dist, scale = _batch_best(images, spec, ysq, a, b, grid, scale_per_image, 1)
        _fold(state, a, b, dist[:, 0], col[:, 0] + offset * grid.n_psi, scale[:, 0])


def update_polar_top_k(top: Any, images: PolarImages, slices: Any, offset: int,
                       grid: PolarGrid, scale_per_image: bool = False,
                       transform: str = "none", image_batch: int = 1024) -> None:
    """Fold one batch of polar slices into the running ``k`` nearest orientations of each
    image (:class:`spinifel.orientation.coarse_to_fine.TopK`, in place; host arrays)."""
    from spinifel.orientation.coarse_to_fine import _select_k

    dtype = np.float32 if images.spectra[0].dtype == np.complex64 else np.float64
    spec, norms = slice_terms(slices, grid, transform, dtype)
    ysq = norms.reshape(-1)
    k = top.index.shape[1]
    big = np.iinfo(np.int64).max
    for a in range(0, images.spectra[0].shape[1], image_batch):
        b = min(a + image_batch, images.spectra[0].shape[1])
        col, dist, _ = _batch_best(images, spec, ysq, a, b, grid, scale_per_image,
                                   min(k, ysq.shape[0]))
        d = np.concatenate([top.dist[a:b], to_module(dist, np)], axis=1)
        i = np.concatenate([top.index[a:b], to_module(col, np) + offset * grid.n_psi], axis=1)
        i = np.where(np.isinf(d) & (i < 0), big, i)
        top.dist[a:b], sel = _select_k(d, i, k)
        top.index[a:b] = np.where(sel == big, -1, sel)


def rescore(images: np.ndarray, candidates: np.ndarray, grid: np.ndarray, slicer: Any,
            scale_per_image: bool = False, transform: str = "none",
            image_batch: int = 256) -> MatchState:
    """Best of each image's candidate orientations by the exact distance over its pixels.

    Parameters
    ----------
    images : ndarray (n, P)
        Untransformed images at the pixels of ``slicer``.
    candidates : ndarray (n, k) int64
        Grid indices per image (-1 = none).
    grid : ndarray (K, 4)
        The orientation grid.
    slicer : spinifel.orientation.slicing.Slicer
        Model slices at the images' pixels (float64 sums, as refinement).

    Returns
    -------
    MatchState
        The exhaustive search's distance, scale and tie rule (lower index) among the
        candidates.
    """
    x_all = apply_transform(np.asarray(images), transform)
    n, k = candidates.shape
    state = MatchState.empty(n)
    for a in range(0, n, image_batch):
        b = min(a + image_batch, n)
        cand = candidates[a:b]
        y = to_module(apply_transform(slicer.slices(grid[np.maximum(cand, 0)].reshape(-1, 4)),
                                      transform), np)
        y = np.asarray(y, dtype=np.float64).reshape(b - a, k, -1)
        x = np.asarray(x_all[a:b], dtype=np.float64)
        cross = np.einsum("np,nkp->nk", x, y)
        ysq = np.einsum("nkp,nkp->nk", y, y)
        xsq = np.einsum("np,np->n", x, x)[:, None]
        if scale_per_image:
            pos = np.maximum(cross, 0)
            den = np.where(ysq > 0, ysq, 1)
            d, sc = xsq - np.where(ysq > 0, pos * pos / den, 0), np.where(ysq > 0, pos / den, 0)
        else:
            d, sc = xsq + ysq - 2 * cross, np.ones_like(cross)
        d = np.where(cand < 0, np.inf, d)
        best = np.lexsort((np.where(cand < 0, np.iinfo(np.int64).max, cand), d), axis=-1)[:, 0]
        rows = np.arange(b - a)
        _fold(state, a, b, d[rows, best], cand[rows, best], sc[rows, best])
    return state


def match_polar(images: Any, grid: PolarGrid, slice_batches: Iterable[tuple[int, Any]],
                scale_per_image: bool = False, transform: str = "none",
                image_batch: int = 1024, dtype=np.float32, candidates: int = 1,
                rescore_with: tuple | None = None) -> MatchState:
    """Best orientation of every image on the factorised grid (polar search).

    Parameters
    ----------
    images : array, shape (n, P)
        Images at the pixels of ``grid`` (untransformed).
    grid : PolarGrid
    slice_batches : iterable of (first direction, array (B, n_points))
        Polar model slices (:meth:`PolarSlicer.iter_batches`).
    scale_per_image, transform
        As :func:`spinifel.orientation.matching.match_orientations`.
    dtype : float32 or float64
        Precision of the correlation GEMMs and FFTs.
    candidates : int
        With ``rescore_with``: orientations kept per image by the polar score and then
        compared by the exact distance (:func:`rescore`).
    rescore_with : (orientation grid (K, 4), Slicer) or None
        None: the polar score's best orientation is the result.

    Returns
    -------
    MatchState
        ``best_index`` into :func:`polar_orientation_grid` ``(n_dir, grid.n_psi)``.
    """
    from spinifel.orientation.coarse_to_fine import TopK

    xp = get_array_module(images)
    prepared = prepare_images(images, grid, transform, dtype)
    if rescore_with is None:
        state = MatchState.empty(images.shape[0], xp)
        for offset, slices in slice_batches:
            update_polar_matches(state, prepared, slices, offset, grid, scale_per_image,
                                 transform, image_batch)
        return state
    top = TopK.empty(images.shape[0], candidates)
    for offset, slices in slice_batches:
        update_polar_top_k(top, prepared, slices, offset, grid, scale_per_image, transform,
                           image_batch)
    return rescore(to_module(images, np), top.index, *rescore_with, scale_per_image, transform)


def _merge_top_k(tops: list, k: int) -> Any:
    """Per image, the ``k`` best of several :class:`TopK` of the same images."""
    from spinifel.orientation.coarse_to_fine import TopK, _select_k

    d = np.concatenate([t.dist for t in tops], axis=1)
    i = np.concatenate([t.index for t in tops], axis=1)
    big = np.iinfo(np.int64).max
    dist, sel = _select_k(d, np.where(np.isinf(d) & (i < 0), big, i), k)
    return TopK(np.where(sel == big, -1, sel), dist)


def match_polar_distributed(comm: Any, images: np.ndarray, grid: PolarGrid, slicer: PolarSlicer,
                            directions: np.ndarray, batch: int, scale_per_image: bool,
                            transform: str, image_batch: int, dtype, candidates: int,
                            rescore_with: tuple, timings: dict | None = None,
                            parts: dict | None = None) -> MatchState:
    """Polar search with the beam directions split over the ranks (collective).

    Every rank prepares its images' spectra once; they are gathered on every rank (about
    ``8 n sum_c F_c K_c`` bytes per rank), so each rank scores all images against its
    contiguous block of directions: polar slicing and slice terms per rank fall as ``1 /
    R``. The per-image ``candidates`` best are merged over the ranks, and each rank
    rescores its own images exactly (:func:`rescore`). The result equals
    :func:`match_polar` with ``rescore_with`` on one rank.

    Parameters
    ----------
    comm : communicator
    images : ndarray (n_local, P)
        This rank's images (untransformed, host).
    directions : ndarray (n_dir, 4)
        The direction quaternions (identical on every rank).
    timings : dict, optional
        Adds "slicing" (polar slices of this rank's directions).
    parts : dict, optional
        Adds "rescoring" (the exact rescoring's seconds, part of the search).
    """
    import time

    from spinifel.orientation.coarse_to_fine import TopK
    from spinifel.parallel.collectives import allgather_objects
    from spinifel.parallel.partition import block_range

    rank, size = comm.Get_rank(), comm.Get_size()
    mine = prepare_images(images, grid, transform, dtype)
    got = allgather_objects(comm, (mine.spectra, mine.image_sq))
    spectra = [np.concatenate([g[0][c] for g in got], axis=1) for c in range(len(grid.annuli))]
    every = PolarImages(spectra, np.concatenate([g[1] for g in got]))
    start = sum(g[1].shape[0] for g in got[:rank])
    a, b = block_range(len(directions), size, rank)
    top = TopK.empty(every.image_sq.shape[0], candidates)
    t_slice = 0.0
    for off in range(a, b, batch):
        t = time.perf_counter()
        slices = slicer.slices(directions[off:min(off + batch, b)])
        t_slice += time.perf_counter() - t
        update_polar_top_k(top, every, slices, off, grid, scale_per_image, transform,
                           image_batch)
    merged = _merge_top_k(allgather_objects(comm, top), candidates)
    t = time.perf_counter()
    own = merged.index[start:start + images.shape[0]]
    state = rescore(images, own, *rescore_with, scale_per_image, transform)
    if timings is not None:
        timings["slicing"] = timings.get("slicing", 0.0) + t_slice
    if parts is not None:
        parts["rescoring"] = parts.get("rescoring", 0.0) + time.perf_counter() - t
    return state


def poisson_terms(slices: Any, grid: PolarGrid, floor_rel: float, dtype=np.float32
                  ) -> tuple[list, Any]:
    """GEMM operands and expected photon sums of one batch of polar slices (Poisson score).

    The model of bin ``b`` is the polar slice clipped at ``floor_rel`` times its mean over
    the bin centres, weighted by the bins' pixel counts (one floor per direction, as
    :func:`spinifel.orientation.likelihood.log_slices` has one per slice).

    Parameters
    ----------
    slices : array, shape (B, n_points)
        Polar model slices (expected photons per pixel at fluence 1).
    grid : PolarGrid
        With ``interpolation="nearest"`` (each pixel in one bin).

    Returns
    -------
    spectra : list of array (F_c, K_c, B) complex
        Angular spectra of the log of the clipped slices.
    sums : array (B, n_psi) float64
        ``S(d, m) = sum_b n_b W_d(b + m L)``: expected photons at fluence 1 over the pixels.
    """
    xp = get_array_module(slices)
    counts = xp.concatenate([to_module(a.counts, xp).ravel() for a in grid.annuli])
    w = xp.asarray(slices, dtype=np.float64)
    mean = (w @ counts) / max(float(counts.sum()), 1.0)
    floor = floor_rel * xp.where(mean > 0, mean, 1.0)
    w = xp.maximum(w, floor[:, None])
    cdtype = np.result_type(dtype, np.complex64)
    spectra = []
    sum_spec = xp.zeros((grid.n_freq, w.shape[0]), dtype=np.complex128)
    for a, y in zip(grid.annuli, split_slices(w, grid)):
        spec = xp.fft.rfft(xp.log(y).astype(dtype), axis=2)
        spectra.append(xp.ascontiguousarray(spec.transpose(2, 1, 0), dtype=cdtype))
        cspec = xp.conj(xp.fft.rfft(to_module(a.counts, xp), axis=1)) * _freq_weights(a.n_angles, xp)
        sum_spec[:a.n_angles // 2 + 1] += xp.einsum("kf,bkf->fb", cspec, xp.fft.rfft(y, axis=2))
    return spectra, fold_to_psi(sum_spec, grid.n_psi).T


def score_polar(images: Any, grid: PolarGrid, slice_batches: Iterable[tuple[int, Any]], *,
                beta: float, max_kept: int, posterior_mass: float, fluence: Any = None,
                fit_scale: bool = False, floor_rel: float = 1e-3, image_batch: int = 512,
                dtype=np.float32) -> Any:
    """Orientation posterior of photon-count images on the factorised grid (Poisson score).

    The binned data are exactly Poisson (each photon in its pixel's nearest bin), and
    ``L(i, d, m) = sum_b K_ib log W_d(b + mL) - phi_i S(d, m)`` (or ``- N_i log S(d, m)``
    with ``fit_scale``) is a correlation of the binned counts with the log-slices
    (:func:`correlate`) plus the expected photon sums (:func:`poisson_terms`). The scores
    stream into :class:`spinifel.orientation.likelihood.PosteriorState` batch by batch
    (grid index ``d * n_psi + m``), so posteriors and the merge work unchanged.

    Parameters
    ----------
    images : array (n, P)
        Photon counts at the pixels of ``grid`` (``interpolation="nearest"``).
    slice_batches : iterable of (first direction, array (B, n_points))
        Polar model slices (:meth:`PolarSlicer.iter_batches`).
    beta, max_kept, posterior_mass, fluence, fit_scale, floor_rel
        As :func:`spinifel.orientation.likelihood.score_orientations`.

    Returns
    -------
    Posterior
        ``mean_slice`` is None (no background estimate from polar slices).
    """
    from spinifel.orientation.likelihood import PosteriorState

    if any(a.bins.shape[1] != 1 for a in grid.annuli):
        raise ValueError("the Poisson polar score needs a grid with interpolation='nearest'")
    if fluence is None and not fit_scale:
        raise ValueError("fluence is required unless fit_scale")
    xp = get_array_module(images)
    n = images.shape[0]
    n_photons = xp.sum(images, axis=1, dtype=np.float64)
    phi = None if fit_scale else xp.asarray(fluence, dtype=np.float64)
    prepared = prepare_images(images, grid, "none", dtype)
    state = PosteriorState.empty(n, max_kept, beta, xp)
    for offset, slices in slice_batches:
        spec, sums = poisson_terms(slices, grid, floor_rel, dtype)
        sums = sums.reshape(-1)
        for a in range(0, n, image_batch):
            b = min(a + image_batch, n)
            sc = correlate([s[:, a:b] for s in prepared.spectra], spec, grid)
            sc = sc.reshape(b - a, -1).astype(np.float64)
            if fit_scale:
                sc -= n_photons[a:b, None] * xp.log(sums)[None, :]
            else:
                sc -= phi[a:b, None] * sums[None, :]
            state.update(sc, offset * grid.n_psi, sums, slice(a, b), count=a == 0)
    return state.finalize(posterior_mass, phi, n_photons)
