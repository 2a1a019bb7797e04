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

Polar grid. Pixels are binned into ``n_rings`` rings of ``|s|`` times ``n_angles``
azimuths ``phi_j = 2 pi j / n_angles`` (``n_angles`` a multiple ``L`` of ``n_psi``); a
bin holds the sum of its pixels' (transformed) values and its pixel count is its weight.
The model slice of direction ``d`` is evaluated once at the bin centres on the Ewald
sphere; the slice of ``q(d, m)`` at bin ``(k, j)`` is then that slice at ``(k, j + m L)``.

Score. The binned Euclidean distance of image ``x`` (bin sums ``S``, counts ``n``) to the
slice ``y`` of ``q(d, m)`` scaled by ``c`` is, up to the within-bin spread of ``x``,

    ``||x||^2 - 2 c X(d, m) + c^2 Y(d, m)``,
    ``X(d, m) = sum_kj S(k, j) y_d(k, j + mL)``,  ``Y(d, m) = sum_kj n(k, j) y_d(k, j + mL)^2``:

circular cross-correlations along the angle, summed over rings. Per angular frequency
``f`` the sum over rings of ``conj(S^(f)) y^(f)`` is one complex GEMM
``(images x rings) @ (rings x directions)``; one inverse real FFT per (image, direction)
gives every in-plane angle. ``||x||^2`` is the pixel norm (as in
:func:`spinifel.orientation.matching.match_orientations`), so distances are comparable.

Everything follows the array module of the images (numpy here; cupy has the same
``fft``/``matmul``); no MPI.
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
class PolarGrid:
    """Polar bins of a set of pixels and the points where model slices are evaluated.

    Attributes
    ----------
    n_rings, n_angles, n_psi : int
        Rings of ``|s|``, azimuths per ring, in-plane angles searched (``n_angles`` is a
        multiple ``step`` of ``n_psi``).
    radii : ndarray (n_rings,) float64
        ``|s|`` of each ring, inverse metres: ``k * s_max / (n_rings - 1)``.
    wavelength : float
        Metres; the Ewald sphere ``s_z = -wavelength |s|^2 / 2`` of the bin centres.
    pixel_bins : ndarray (P, J) int64
        Flat bins ``ring * n_angles + angle`` each pixel contributes to (J = 1 for
        ``"nearest"``, 4 for ``"linear"``).
    pixel_weights : ndarray (P, J) float64
        Their weights (sum 1 per pixel): the pixel's value of the polar slice is
        ``sum_J weight * slice[bin]``.
    counts : ndarray (n_rings, n_angles) float64
        Sum of the weights per bin (pixels per bin for ``"nearest"``).
    gram : tuple of (dk, dj, ndarray (n_rings, n_angles))
        The Gram matrix ``W^T W`` of the interpolation by bin offset ``(dk, dj)``: the
        squared norm over the pixels of an interpolated slice ``y`` is
        ``sum_(dk, dj) sum_kj G(k, j) y(k, j) y(k + dk, j + dj)``.
    """

    n_rings: int
    n_angles: int
    n_psi: int
    radii: np.ndarray
    wavelength: float
    pixel_bins: np.ndarray
    pixel_weights: np.ndarray
    counts: np.ndarray
    gram: tuple

    @property
    def step(self) -> int:
        """Angular bins per in-plane step ``n_angles / n_psi``."""
        return self.n_angles // self.n_psi

    @property
    def n_freq(self) -> int:
        """Real-FFT frequencies along the angle, ``n_angles // 2 + 1``."""
        return self.n_angles // 2 + 1

    def matrix(self):
        """The interpolation as a scipy CSR matrix ``(P, n_rings * n_angles)``."""
        from scipy.sparse import csr_matrix

        P, J = self.pixel_bins.shape
        return csr_matrix((self.pixel_weights.ravel(), self.pixel_bins.ravel(),
                           np.arange(0, P * J + 1, J)), shape=(P, self.n_rings * self.n_angles))


def pixel_spacing(positions: np.ndarray, outer: float = 0.9) -> float:
    """Median nearest-neighbour distance of the pixels beyond ``outer`` of the largest ``|s|``
    (inverse metres): the pixel size at the outer radius."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, dtype=np.float64).T
    s = np.linalg.norm(pos, axis=1)
    d, _ = cKDTree(pos).query(pos[s >= outer * s.max()], k=2)
    return float(np.median(d[:, 1]))


def polar_shape(positions: np.ndarray, n_psi: int, ring_oversample: float = 2.0,
                angle_oversample: float = 1.0) -> tuple[int, int]:
    """Automatic ``(n_rings, n_angles)`` from the pixel size ``h`` at the outer radius.

    Rings ``h / ring_oversample`` apart from the beam (ring 0) to ``s_max``; azimuths
    ``h / angle_oversample`` apart at ``s_max``, ``n_angles`` a multiple of ``n_psi`` with
    an FFT-friendly ratio. The defaults were measured (docs/algorithm.md): with linear
    interpolation the radial spacing limits agreement with exhaustive search (half-pixel
    rings: 99.3-100% of images within one grid step, pixel-sized rings 97-98.7%), while
    finer azimuths changed nothing.
    """
    pos = np.asarray(to_module(positions, np), dtype=np.float64)
    s_max = float(np.linalg.norm(pos, axis=0).max())
    h = pixel_spacing(pos)
    n_rings = max(int(np.ceil(s_max / h * ring_oversample)), 1) + 1
    step = smooth_size(int(np.ceil(2.0 * np.pi * s_max / h * angle_oversample / n_psi)))
    return n_rings, step * int(n_psi)


def _interpolation(ring_pos: np.ndarray, ang_pos: np.ndarray, n_rings: int, n_angles: int,
                   interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Bins ``(P, J)`` and weights of pixels at fractional ring/angle coordinates."""
    if interpolation == "nearest":
        k = np.minimum(np.rint(ring_pos).astype(np.int64), n_rings - 1)
        j = np.rint(ang_pos).astype(np.int64) % n_angles
        return (k * n_angles + j)[:, None], np.ones((len(k), 1))
    if interpolation != "linear":
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    k0 = np.minimum(np.floor(ring_pos).astype(np.int64), max(n_rings - 2, 0))
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
    """``W^T W`` of the interpolation matrix grouped by bin offset (see :class:`PolarGrid`)."""
    g = (mat.T @ mat).tocoo()
    k, j = np.divmod(g.row, n_angles)
    k2, j2 = np.divmod(g.col, n_angles)
    dk = k2 - k
    dj = (j2 - j + n_angles // 2) % n_angles - n_angles // 2
    out = []
    for e in sorted(set(zip(dk.tolist(), dj.tolist()))):
        sel = (dk == e[0]) & (dj == e[1])
        m = np.zeros(n_rings * n_angles)
        np.add.at(m, g.row[sel], g.data[sel])
        out.append((int(e[0]), int(e[1]), m.reshape(n_rings, n_angles)))
    return tuple(out)


def make_polar_grid(positions: np.ndarray, n_psi: int, n_rings: int = 0, n_angles: int = 0,
                    interpolation: str = "linear") -> PolarGrid:
    """Polar bins of the pixels at ``positions``.

    Parameters
    ----------
    positions : ndarray, shape (3, P)
        Reciprocal positions of the (good, matched) pixels, inverse metres, on an Ewald
        sphere about the beam axis ``z``.
    n_psi : int
        In-plane angles searched.
    n_rings, n_angles : int
        0 = :func:`polar_shape` (bins about one pixel at the outer radius). ``n_angles``
        is rounded up to a multiple of ``n_psi``; ``n_rings >= 2``.
    interpolation : {"linear", "nearest"}
        How a pixel reads the polar slice: bilinear in ``(|s|, phi)`` between its 4
        surrounding bin centres (the Euclidean score: the cross term is then exactly that
        of the interpolated slice), or its nearest bin only (each photon in one bin: the
        binned counts stay Poisson).
    """
    pos = np.asarray(to_module(positions, np), dtype=np.float64)
    if n_rings == 0 or n_angles == 0:
        auto = polar_shape(pos, n_psi)
        n_rings, n_angles = n_rings or auto[0], n_angles or auto[1]
    n_rings = max(int(n_rings), 2)
    n_angles = max(int(np.ceil(n_angles / n_psi)), 1) * int(n_psi)
    s = np.linalg.norm(pos, axis=0)
    s_max = float(s.max())
    phi = np.arctan2(pos[1], pos[0]) % (2.0 * np.pi)
    bins, w = _interpolation(s / s_max * (n_rings - 1), phi / (2.0 * np.pi) * n_angles,
                             n_rings, n_angles, interpolation)
    counts = np.bincount(bins.ravel(), w.ravel(), n_rings * n_angles)
    grid = PolarGrid(n_rings, n_angles, int(n_psi), np.linspace(0.0, s_max, n_rings),
                     _ewald_wavelength(pos, s), bins, w, counts.reshape(n_rings, n_angles), ())
    return PolarGrid(**{**grid.__dict__, "gram": _gram_maps(grid.matrix(), n_rings, n_angles)})


def _ewald_wavelength(pos: np.ndarray, s: np.ndarray) -> float:
    """Least-squares ``lambda`` of the Ewald sphere ``s_z = -lambda |s|^2 / 2`` (0: flat)."""
    s4 = float(np.sum(s**4))
    return -2.0 * float(np.sum(pos[2] * s * s)) / s4 if s4 > 0 else 0.0


def polar_points(grid: PolarGrid) -> np.ndarray:
    """Reciprocal positions of the bin centres, ``(3, n_rings * n_angles)`` float64, ring-major.

    Ring ``k`` at azimuth ``phi_j = 2 pi j / n_angles`` on the Ewald sphere:
    ``s_z = -lambda r_k^2 / 2``, ``s_perp = sqrt(r_k^2 - s_z^2)``.
    """
    r = grid.radii
    sz = -0.5 * grid.wavelength * r * r
    sp = np.sqrt(np.maximum(r * r - sz * sz, 0.0))
    phi = 2.0 * np.pi * np.arange(grid.n_angles) / grid.n_angles
    x = sp[:, None] * np.cos(phi)[None, :]
    y = sp[:, None] * np.sin(phi)[None, :]
    z = np.broadcast_to(sz[:, None], x.shape)
    return np.stack([x.ravel(), y.ravel(), np.ascontiguousarray(z).ravel()])


def bin_images(images: Any, grid: PolarGrid) -> Any:
    """Each image's pixel values spread onto the polar bins with the grid's weights.

    Parameters
    ----------
    images : array, shape (n, P)
        Values at the pixels of ``grid`` (numpy or cupy).

    Returns
    -------
    array, shape (n, n_rings, n_angles), float64
        ``S_i(b) = sum_p w_pb x_ip`` (bin sums for ``"nearest"``).
    """
    xp = get_array_module(images)
    n = images.shape[0]
    if xp is np:
        out = np.asarray((grid.matrix().T @ np.asarray(images, dtype=np.float64).T).T)
    else:  # pragma: no cover - device path
        out = xp.zeros((n, grid.n_rings * grid.n_angles), dtype=np.float64)
        x = images.astype(np.float64)
        for c in range(grid.pixel_bins.shape[1]):
            w = to_module(grid.pixel_weights[:, c], xp)
            xp.add.at(out, (slice(None), to_module(grid.pixel_bins[:, c], xp)), x * w)
    return out.reshape(n, grid.n_rings, grid.n_angles)


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
        pts = polar_points(grid)
        pts = to_module(pts, get_array_module(autocorrelation))
        self._slicer = Slicer(autocorrelation, pts, reciprocal_extent, eps, dtype, nthreads)

    def slices(self, direction_quaternions: np.ndarray) -> Any:
        """Polar slices ``(B, n_rings, n_angles)`` of directions ``q_d`` ``(B, 4)``."""
        g = self.grid
        return self._slicer.slices(direction_quaternions).reshape(-1, g.n_rings, g.n_angles)

    def iter_batches(self, direction_quaternions: np.ndarray, batch: int
                     ) -> Iterator[tuple[int, Any]]:
        """Yield ``(first direction, slices)`` for batches of at most ``batch`` directions."""
        for a in range(0, len(direction_quaternions), batch):
            yield a, self.slices(direction_quaternions[a:a + batch])


@dataclass
class PolarImages:
    """Images prepared once for the polar search.

    Attributes
    ----------
    spectra : array (n_freq, n, n_rings) complex
        Conjugated angular spectra of the bin sums, frequency-major (GEMM operands).
    image_sq : array (n,) float64
        ``||x||^2`` over the pixels (after the transform).
    """

    spectra: Any
    image_sq: Any


def prepare_images(images: Any, grid: PolarGrid, transform: str = "none",
                   dtype=np.float32) -> PolarImages:
    """Bin ``images`` ``(n, P)`` (after ``transform``) and FFT the bins along the angle.

    ``dtype`` (float32 or float64) sets the precision of the correlation GEMMs.
    """
    xp = get_array_module(images)
    x = apply_transform(images, transform)
    sq = xp.einsum("np,np->n", x, x, dtype=np.float64)
    spec = xp.fft.rfft(bin_images(x, grid), axis=2)  # (n, K, F) complex128
    cdtype = np.result_type(dtype, np.complex64)
    spec = xp.ascontiguousarray(xp.conj(spec).transpose(2, 0, 1), dtype=cdtype)
    return PolarImages(spec, sq)


def slice_terms(slices: Any, grid: PolarGrid, transform: str = "none",
                dtype=np.float32) -> tuple[Any, Any]:
    """GEMM operands and norms of one batch of polar slices.

    Parameters
    ----------
    slices : array, shape (B, n_rings, n_angles)
        Untransformed polar model slices of ``B`` directions.

    Returns
    -------
    spectra : array (n_freq, n_rings, B) complex
        Angular spectra of the transformed slices.
    norms : array (B, n_psi) float64
        ``Y(d, m) = sum_kj n(k, j) y_d(k, j + m L)^2``.
    """
    xp = get_array_module(slices)
    y = apply_transform(slices, transform).astype(np.float64)
    cdtype = np.result_type(dtype, np.complex64)
    spec = xp.fft.rfft(y, axis=2)  # (B, K, F)
    return xp.ascontiguousarray(spec.transpose(2, 1, 0), dtype=cdtype), slice_norms(y, grid)


def slice_norms(y: Any, grid: PolarGrid) -> Any:
    """Squared norms over the pixels of the interpolated slices at every in-plane angle.

    ``Y(d, m) = sum_(dk, dj) sum_kj G(k, j) y_d(k, j + mL) y_d(k + dk, j + dj + mL)``: one
    correlation along the angle per Gram offset of :class:`PolarGrid`.

    Parameters
    ----------
    y : array, shape (B, n_rings, n_angles), float64
        Transformed polar slices.

    Returns
    -------
    array, shape (B, n_psi), float64
    """
    xp = get_array_module(y)
    acc = 0
    for dk, dj, g in grid.gram:
        other = xp.zeros_like(y)
        k_hi = grid.n_rings - max(dk, 0)
        k_lo = max(-dk, 0)
        other[:, k_lo:k_hi] = xp.roll(y[:, k_lo + dk:k_hi + dk], -dj, axis=2)
        gspec = xp.conj(xp.fft.rfft(to_module(g, xp), axis=1))  # (K, F)
        acc = acc + xp.einsum("kf,bkf->bf", gspec, xp.fft.rfft(y * other, axis=2))
    return xp.fft.irfft(acc, n=grid.n_angles, axis=1)[:, ::grid.step]


def correlate(image_spectra: Any, slice_spectra: Any, grid: PolarGrid) -> Any:
    """``X(i, d, m) = sum_kj S_i(k, j) y_d(k, j + m L)`` for every image, direction, angle.

    Parameters
    ----------
    image_spectra : array (n_freq, n, n_rings) complex
        From :func:`prepare_images` (conjugated).
    slice_spectra : array (n_freq, n_rings, B) complex
        From :func:`slice_terms`.

    Returns
    -------
    array, shape (n, B, n_psi), real (float32 for complex64 operands)
    """
    xp = get_array_module(image_spectra, slice_spectra)
    prod = xp.matmul(image_spectra, slice_spectra)  # (F, n, B): one GEMM per frequency
    prod = xp.ascontiguousarray(prod.transpose(1, 2, 0))
    return xp.fft.irfft(prod, n=grid.n_angles, axis=2)[:, :, ::grid.step]


def update_polar_matches(state: MatchState, images: PolarImages, slices: Any, offset: int,
                         grid: PolarGrid, scale_per_image: bool = False,
                         transform: str = "none", image_batch: int = 1024) -> None:
    """Fold one batch of polar slices (directions ``offset ..``) into the running best match.

    Same distances and tie rule (lower grid index) as
    :func:`spinifel.orientation.matching.update_matches`, on the binned images; the grid
    index is ``d * n_psi + m``.
    """
    xp = get_array_module(images.spectra)
    dtype = np.float32 if images.spectra.dtype == np.complex64 else np.float64
    spec, norms = slice_terms(slices, grid, transform, dtype)
    n = images.spectra.shape[1]
    for a in range(0, n, image_batch):
        b = min(a + image_batch, n)
        cross = correlate(images.spectra[:, a:b], spec, grid).reshape(b - a, -1)
        ysq = norms.reshape(-1)
        rows = xp.arange(b - a)
        if scale_per_image:
            pos = xp.maximum(cross, 0).astype(np.float64)
            gain = xp.where(ysq > 0, pos * pos / xp.where(ysq > 0, ysq, 1), 0.0)
            idx = xp.argmax(gain, axis=1)
            dist = images.image_sq[a:b] - gain[rows, idx]
            den = ysq[idx]
            scale = xp.where(den > 0, pos[rows, idx] / xp.where(den > 0, den, 1), 0.0)
        else:
            part = ysq[None, :] - 2.0 * cross
            idx = xp.argmin(part, axis=1)
            dist = images.image_sq[a:b] + part[rows, idx]
            scale = xp.ones(b - a)
        _fold(state, a, b, dist, idx + offset * grid.n_psi, scale)


def match_polar(images: Any, grid: PolarGrid, slice_batches: Iterable[tuple[int, Any]],
                scale_per_image: bool = False, transform: str = "none",
                image_batch: int = 1024, dtype=np.float32) -> MatchState:
    """Best orientation of every image on the factorised grid (polar search).

    Parameters
    ----------
    images : array, shape (n, P)
        Images at the pixels binned by ``grid`` (untransformed).
    grid : PolarGrid
    slice_batches : iterable of (first direction, array (B, n_rings, n_angles))
        Polar model slices (:meth:`PolarSlicer.iter_batches`).
    scale_per_image, transform
        As :func:`spinifel.orientation.matching.match_orientations`.
    dtype : float32 or float64
        Precision of the correlation GEMMs and FFTs.

    Returns
    -------
    MatchState
        ``best_index`` into :func:`polar_orientation_grid` ``(n_dir, grid.n_psi)``.
    """
    xp = get_array_module(images)
    prepared = prepare_images(images, grid, transform, dtype)
    state = MatchState.empty(images.shape[0], xp)
    for offset, slices in slice_batches:
        update_polar_matches(state, prepared, slices, offset, grid, scale_per_image,
                             transform, image_batch)
    return state
