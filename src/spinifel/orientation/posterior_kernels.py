"""Compiled (numba) passes of the streaming orientation posterior, CPU only.

:class:`spinifel.orientation.likelihood.PosteriorState` folds every orientation batch's
scores into per-image running sums and a top-k buffer. In numpy that is a dozen passes over
each block of scores plus a scatter of the top-k candidates; here (:func:`fold_rows`) each
image row is read once from the float32 GEMM output into a float64 row with the fluence
term ``a_k c_j`` (and its maximum); loops over that cached row then give the exponentials
(a vectorised exp, :func:`exp_into`), the three running sums, and the admission of the
top-k candidates. A full buffer is thinned at a threshold estimated from a sample of it
(:func:`compact_row`). :meth:`PosteriorState.finalize` thins every row the same way, sorts
the survivors with numpy's argsort and orders ties (:func:`order_rows_desc`), then
sparsifies (:func:`sparsify`); the slices' log-floor and sums are :func:`clip_rows`.

The results are those of the numpy path: the same formulas in the same float64
arithmetic, with the sums accumulated in another order, so they agree to round-off. The
top-k selection keeps the exact order "descending score, then ascending orientation index",
also for ties at the k-th place.

numba is imported only when this module is (lazily, by the first CPU fold), so importing
the package stays cheap. The functions are compiled on first use and cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _better(s1: float, i1: int, s2: float, i2: int) -> bool:
    """Entry 1 precedes entry 2: higher score, or the same score and a lower index."""
    return s1 > s2 or (s1 == s2 and i1 < i2)


@njit(cache=True, nogil=True)
def _swap(s: np.ndarray, i: np.ndarray, p: int, q: int) -> None:
    s[p], s[q] = s[q], s[p]
    i[p], i[q] = i[q], i[p]


@njit(cache=True, nogil=True)
def select_first(s: np.ndarray, i: np.ndarray, n: int, k: int) -> None:
    """Reorder the first ``n`` entries of ``(s, i)`` in place so that the ``k`` first in
    (score desc, index asc) order come first, the ``k``-th at position ``k - 1``.

    Quickselect with a median-of-three pivot; each pass splits into two scratch buffers
    without branches on the comparison (on scores in random order a branch mispredicts
    half the time, and that dominated). The order is total, since indices differ.
    """
    ls = np.empty(n)
    li = np.empty(n, dtype=np.int64)
    rs = np.empty(n)
    ri = np.empty(n, dtype=np.int64)
    lo = 0
    hi = n  # the k-th lies in [lo, hi)
    while hi - lo > 1:
        a = lo
        m = (lo + hi) // 2
        z = hi - 1
        # the median of three as the pivot (by the total order)
        if _better(s[m], i[m], s[a], i[a]):
            a, m = m, a
        if _better(s[z], i[z], s[m], i[m]):
            m = z if not _better(s[z], i[z], s[a], i[a]) else a
        ps = s[m]
        pi = i[m]
        nl = 0
        nr = 0
        for q in range(lo, hi):
            x = s[q]
            y = i[q]
            go_left = (x > ps) | ((x == ps) & (y <= pi))  # the pivot itself goes left
            ls[nl] = x
            li[nl] = y
            rs[nr] = x
            ri[nr] = y
            nl += go_left
            nr += 1 - go_left
        s[lo:lo + nl] = ls[:nl]
        i[lo:lo + nl] = li[:nl]
        s[lo + nl:hi] = rs[:nr]
        i[lo + nl:hi] = ri[:nr]
        if lo + nl == k:  # the left part is exactly the k first: the k-th is its worst
            worst = lo
            for q in range(lo + 1, lo + nl):
                if _better(s[worst], i[worst], s[q], i[q]):
                    worst = q
            _swap(s, i, worst, k - 1)
            return
        if nl == hi - lo:  # the pivot was the range's worst: put it last, outside the k
            for q in range(lo, hi):
                if s[q] == ps and i[q] == pi:
                    _swap(s, i, q, hi - 1)
                    break
            hi -= 1
        elif lo + nl > k:
            hi = lo + nl
        else:
            lo = lo + nl


_SAMPLE = 64  # buffer entries sampled for a compaction's threshold
_MARGIN = 2.0  # standard errors of the sample quantile added to the kept fraction


@njit(cache=True, nogil=True)
def _threshold_from_sample(top_s: np.ndarray, fill: int, k: int) -> float:
    """A score likely a little below the k-th largest of ``top_s[:fill]``: the sample
    quantile at the k-th's rank plus two standard errors, from ``_SAMPLE`` entries."""
    stride = fill // _SAMPLE
    smp = np.empty(_SAMPLE)
    for q in range(_SAMPLE):
        smp[q] = top_s[q * stride]
    smp.sort()
    p = k / fill
    frac = min(p + _MARGIN * math.sqrt(p * (1.0 - p) / _SAMPLE), 1.0)
    rank = min(int(frac * _SAMPLE), _SAMPLE - 1)  # from the top
    return smp[_SAMPLE - 1 - rank]


@njit(cache=True, nogil=True)
def compact_row(top_s: np.ndarray, top_i: np.ndarray, fill: int, k: int) -> tuple[int, float]:
    """Drop from one row's buffer entries that can no longer be among its ``k`` first in
    (score desc, index asc) order, in place (the kept ones unordered at the front, the rest
    ``-inf``/-1). Returns the new fill and bar: every entry kept has a score at or above
    the bar, and at least ``k`` are kept, so the bar is at most the k-th largest score.

    A threshold from a sample of the buffer (one counting pass, one filtering pass) keeps
    a few more than ``k`` at a fraction of an exact selection's cost; when the sample
    misses (fewer than ``k`` at or above it, or too many to free half the room), the exact
    selection keeps exactly ``k`` and the bar is the k-th score.
    """
    if fill <= k:
        return fill, -np.inf
    if fill >= 2 * _SAMPLE:
        v = _threshold_from_sample(top_s, fill, k)
        cnt = 0
        for q in range(fill):
            cnt += top_s[q] >= v
        if k <= cnt <= (fill + k) // 2:
            w = 0
            for q in range(fill):  # branch-free: every entry written, kept ones advance
                x = top_s[q]
                top_s[w] = x
                top_i[w] = top_i[q]
                w += x >= v
            top_s[w:fill] = -np.inf
            top_i[w:fill] = -1
            return w, v
    select_first(top_s, top_i, fill, k)
    top_s[k:fill] = -np.inf
    top_i[k:fill] = -1
    return k, top_s[k - 1]


# Reassociation lets the compiler vectorise the sums (their order changes, not their
# terms); no flag that assumes finite values: -inf marks empty entries.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN = -708.0  # below: 0 (exp(-708) = 3e-308, the float64 normal range ends there)


@njit(cache=True, nogil=True, fastmath=_FAST)
def exp_into(t: np.ndarray, e: np.ndarray, bits: np.ndarray) -> None:
    """``e = exp(t)`` for ``t <= 0`` (float64, about 1e-14 relative; 0 below ``_EXP_MIN``).

    A loop the compiler vectorises (``math.exp`` in a loop is a scalar libm call, 3.5x
    slower here): ``exp(t) = 2^k exp(r)``, ``r = t - k ln 2`` in ``[-ln2/2, ln2/2]``, with
    ``exp(r)`` by its Taylor series to ``r^13`` (truncation below 2e-16) and ``2^k`` built
    from its exponent bits.
    """
    n = t.shape[0]
    for q in range(n):
        x = max(t[q], _EXP_MIN)
        kf = math.floor(x * _LOG2E + 0.5)
        r = (x - kf * _LN2_HI) - kf * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        e[q] = p * r + 1.0
        bits[q] = (np.int64(kf) + 1023) << 52
    scale = bits[:n].view(np.float64)
    for q in range(n):
        e[q] = e[q] * scale[q] if t[q] > _EXP_MIN else 0.0


@njit(cache=True, nogil=True, fastmath=_FAST)
def _row_sums(v: np.ndarray, t: np.ndarray, e: np.ndarray, bits: np.ndarray,
              slice_sums: np.ndarray, beta: float, m_new: float) -> tuple[float, float, float]:
    """``t = beta v - m_new``, ``e = exp(t)`` (:func:`exp_into`); returns ``sum e``,
    ``sum e t``, ``sum e S``."""
    b = v.shape[0]
    for q in range(b):
        t[q] = beta * v[q] - m_new
    exp_into(t, e, bits)
    se = 0.0
    st = 0.0
    ss = 0.0
    for q in range(b):
        se += e[q]
        st += e[q] * t[q]
        ss += e[q] * slice_sums[q]
    return se, st, ss


@njit(cache=True, nogil=True, fastmath=_FAST)
def _row_values(row: np.ndarray, ar: float, c: np.ndarray, v: np.ndarray) -> float:
    """``v = row - ar * c`` in float64; returns its maximum."""
    mx = -np.inf
    for j in range(row.shape[0]):
        x = row[j] - ar * c[j]
        v[j] = x
        mx = max(mx, x)
    return mx


@njit(cache=True, nogil=True)
def fold_rows(scores: np.ndarray, a: np.ndarray, c: np.ndarray, slice_sums: np.ndarray,
              beta: float, offset: int, log_never_kept: float, k: int, r0: int,
              run_max: np.ndarray, run_sum: np.ndarray, run_t: np.ndarray, run_s: np.ndarray,
              top_s: np.ndarray, top_i: np.ndarray, fill: np.ndarray,
              bar: np.ndarray) -> None:
    """Fold ``L = scores - a[:, None] * c[None, :]`` (rows ``r0 ..`` of the state) in place.

    Parameters
    ----------
    scores : (n, B) float32 or float64
        The GEMM ``K log W^T`` of ``n`` images and ``B`` orientations ``offset ..``.
    a, c : (n,) and (B,) float64
        The fluence term's factors (zeros for none).
    slice_sums : (B,) float64
    beta, offset, log_never_kept, k
        As in :class:`spinifel.orientation.likelihood.PosteriorState`.
    run_max, run_sum, run_t, run_s, fill, bar : (N,) state arrays; top_s, top_i : (N, C)
        The state of all images; rows ``r0 .. r0 + n`` are updated. ``C == 1``: the running
        best with ties to the lower index; else the buffered top-k (``C >= 2k``).
    """
    n, b = scores.shape
    cap = top_s.shape[1]
    v = np.empty(b)
    t = np.empty(b)
    e = np.empty(b)
    bits = np.empty(b, dtype=np.int64)
    for r in range(n):
        row = r0 + r
        ar = a[r]
        mx = _row_values(scores[r], ar, c, v)
        m_old = run_max[row]
        m_new = max(m_old, beta * mx)
        se, st, ss = _row_sums(v, t, e, bits, slice_sums, beta, m_new)
        if cap == 1:
            best_s = top_s[row, 0]
            best_i = top_i[row, 0]
            for j in range(b):
                if best_i < 0 or _better(v[j], offset + j, best_s, best_i):
                    best_s = v[j]
                    best_i = offset + j
            top_s[row, 0] = best_s
            top_i[row, 0] = best_i
        else:
            f = fill[row]
            bar_r = bar[row]
            floor = (m_new + log_never_kept) / beta  # -inf without pruning
            for j in range(b):
                x = v[j]
                if x >= bar_r and x > floor:  # ties at the bar may still enter (lower index)
                    if f == cap:
                        f, bar_r = compact_row(top_s[row], top_i[row], f, k)
                        if not (x >= bar_r):
                            continue
                    top_s[row, f] = x
                    top_i[row, f] = offset + j
                    f += 1
            fill[row] = f
            bar[row] = bar_r
        # rescale the old sums to the new maximum (nothing to rescale on the first batch)
        d = m_old - m_new if m_old > -np.inf else 0.0
        cf = math.exp(d)
        s_old = run_sum[row]
        run_t[row] = cf * (run_t[row] + d * s_old) + st
        run_sum[row] = cf * s_old + se
        run_s[row] = cf * run_s[row] + ss
        run_max[row] = m_new


@njit(cache=True, nogil=True)
def thin_rows(top_s: np.ndarray, top_i: np.ndarray, fill: np.ndarray, k: int) -> None:
    """:func:`compact_row` on every row holding more than ``k`` (``fill`` updated): at
    least the ``k`` first entries of each row stay, in about ``k`` columns, for the final
    sort (:meth:`PosteriorState.finalize`)."""
    for r in range(top_s.shape[0]):
        if fill[r] > k:
            fill[r] = compact_row(top_s[r], top_i[r], fill[r], k)[0]


@njit(cache=True, nogil=True)
def order_rows_desc(top_s: np.ndarray, top_i: np.ndarray, ascending: np.ndarray,
                    k: int) -> None:
    """Write into the first ``k`` columns of every row its ``k`` first entries in (score
    desc, index asc) order, in place, given ``ascending`` (n, w), ``w >= k``: an argsort of
    the row's first ``w`` scores in ascending order (numpy's sort is the fast one). Runs of
    equal scores are put in index order over all ``w`` before the cut at ``k``."""
    n, w = ascending.shape
    s = np.empty(w)
    i = np.empty(w, dtype=np.int64)
    for r in range(n):
        for q in range(w):
            o = ascending[r, w - 1 - q]
            s[q] = top_s[r, o]
            i[q] = top_i[r, o]
        q = 0
        while q < k:  # runs of equal finite scores that reach into the first k
            e = q + 1
            while e < w and s[e] == s[q]:
                e += 1
            if e - q > 1 and s[q] > -np.inf:
                i[q:e] = np.sort(i[q:e])
            q = e
        top_s[r, :k] = s[:k]
        top_i[r, :k] = i[:k]


@njit(cache=True, nogil=True)
def sparsify(top_s: np.ndarray, top_i: np.ndarray, log_z: np.ndarray, beta: float,
             mass: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`PosteriorState.finalize`'s selection on sorted rows (n, k): per row the
    smallest prefix whose probabilities ``exp(beta s - log_z)`` reach ``mass`` (at least
    one, at most the finite entries), renormalised.

    Returns ``indices`` (-1 beyond the prefix), ``weights`` (0 beyond), ``n_kept`` and the
    kept mass before renormalisation.
    """
    n, k = top_s.shape
    idx = np.full((n, k), -1, dtype=np.int64)
    w = np.zeros((n, k))
    n_kept = np.zeros(n, dtype=np.int64)
    total = np.zeros(n)
    for r in range(n):
        cum = 0.0
        m = 0
        for q in range(k):
            s = top_s[r, q]
            if s == -np.inf or (q > 0 and cum >= mass):
                break
            p = math.exp(beta * s - log_z[r])
            w[r, q] = p
            idx[r, q] = top_i[r, q]
            cum += p
            m += 1
        n_kept[r] = m
        total[r] = cum
        for q in range(m):
            w[r, q] /= cum
    return idx, w, n_kept, total


@njit(cache=True, nogil=True, fastmath=_FAST)
def clip_rows(slices: np.ndarray, floor_rel: float, out: np.ndarray,
              column_sums: np.ndarray) -> np.ndarray:
    """``out = max(slices, floor_rel * mean)`` per row (the mean over the row, float64;
    ``floor_rel`` absolute for a row whose mean is not positive); returns the clipped rows'
    sums (float64) and adds the unclipped rows to ``column_sums`` (P,) float64 (or nothing
    when it is empty). :func:`spinifel.orientation.likelihood.log_slices` then takes the
    log of ``out`` in place."""
    b, p = slices.shape
    sums = np.empty(b)
    add = column_sums.shape[0] == p
    for j in range(b):
        acc = 0.0
        for q in range(p):
            acc += slices[j, q]
        if add:
            for q in range(p):
                column_sums[q] += slices[j, q]
        mean = acc / p
        floor = floor_rel * (mean if mean > 0 else 1.0)
        f = out.dtype.type(floor)
        acc = 0.0
        for q in range(p):
            x = max(slices[j, q], f)
            out[j, q] = x
            acc += x
        sums[j] = acc
    return sums
