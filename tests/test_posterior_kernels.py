"""The compiled (numba) passes of the streaming posterior against numpy and brute force."""

import numpy as np
import pytest

from spinifel.orientation import likelihood
from spinifel.orientation.likelihood import PosteriorState

K = pytest.importorskip("spinifel.orientation.posterior_kernels")


def _stream(scores, k, beta, batch, compiled, monkeypatch, mass=0.999, n_orient=0, order=None):
    """Fold ``scores`` (n, J) batch by batch (in ``order`` of batch starts) and finalize."""
    monkeypatch.setattr(likelihood, "USE_COMPILED", compiled)
    n, J = scores.shape
    sums = np.linspace(1.0, 2.0, J)
    st = PosteriorState.empty(n, k, beta, np, mass, n_orient)
    starts = list(range(0, J, batch)) if order is None else order
    for a in starts:
        st.update(scores[:, a:a + batch], a, sums[a:a + batch])
    return st.finalize(mass, np.ones(n))


@pytest.mark.parametrize("k,batch,beta,prune", [(1, 7, 1.0, False), (5, 3, 1e-3, False),
                                                (40, 50, 1e-3, False), (40, 13, 1.0, True),
                                                (200, 64, 1e-3, False), (200, 500, 0.3, True)])
def test_compiled_fold_equals_numpy_fold(rng, monkeypatch, k, batch, beta, prune):
    """Catches a compiled pass that differs from the numpy one: a wrong rescaling of the
    running sums, a lost or duplicated top-k entry at a compaction (the buffers overflow
    many times here: J >> 2k for the small k), a wrong bar after the sampled compaction
    (k = 200 on buffers of 400 uses the sampled threshold), a wrong hard assignment. The
    float32 scores are continuous (no ties), so both paths keep the same set; the sums
    agree to round-off of J terms."""
    n, J = 37, 1500
    scores = (rng.normal(-5000, 40, (n, J))).astype(np.float32)
    scores[:, 600:700] += 60  # a block of good orientations: the bar jumps mid-stream
    kw = {"mass": 0.999, "n_orient": J if prune else 0}
    ref = _stream(scores, k, beta, batch, False, monkeypatch, **kw)
    got = _stream(scores, k, beta, batch, True, monkeypatch, **kw)
    assert np.array_equal(got.indices, ref.indices)
    assert np.array_equal(got.n_kept, ref.n_kept)
    tol = 64 * J * np.finfo(np.float64).eps
    for f in ("weights", "entropy", "expected_slice_sum", "dropped_mass"):
        assert np.allclose(getattr(got, f), getattr(ref, f), rtol=tol, atol=tol), f
    assert np.array_equal(got.log_likelihood, ref.log_likelihood)


@pytest.mark.parametrize("k,J,batch,levels", [(150, 900, 37, 40), (6, 200, 7, 12),
                                              (40, 400, 3, 25)])
def test_compiled_top_k_ties_brute_force(rng, monkeypatch, k, J, batch, levels):
    """Catches a tie at the k-th place broken other than by the lower index, in the
    compaction (sampled for k = 150, exact for the small buffers), the admission of an
    entry equal to the bar, or the final selection: integer scores with many ties, batches
    in reverse order; brute force is a lexicographic sort of the dense scores."""
    n = 25
    scores = rng.integers(-levels, 0, (n, J)).astype(np.float64)
    post = _stream(scores, k, 1e-3, batch, True, monkeypatch, mass=1.0,
                   order=list(range(0, J, batch))[::-1])
    ref = np.lexsort((np.broadcast_to(np.arange(J), scores.shape), -scores), axis=1)[:, :k]
    assert np.array_equal(post.indices, ref)


@pytest.mark.parametrize("fill,k", [(10, 3), (300, 150), (1024, 512), (2048, 64), (700, 699)])
def test_compact_row_keeps_the_k_first(rng, fill, k):
    """Catches a compaction that drops one of the k first in (score desc, index asc) order
    or returns a bar above the k-th score (entries would then be refused that belong in
    the top k). Scores with ties; brute force by a lexicographic sort."""
    s = rng.integers(0, fill // 3 + 2, fill).astype(np.float64)
    i = rng.permutation(10 * fill)[:fill].astype(np.int64)
    ref = set(i[np.lexsort((i, -s))[:k]].tolist())
    kth = np.sort(s)[::-1][k - 1]
    ts, ti = s.copy(), i.copy()
    w, bar = K.compact_row(ts, ti, fill, k)
    assert k <= w <= fill and bar <= kth
    assert ref <= set(ti[:w].tolist())
    assert np.all(ts[:w] >= bar) and np.all(ts[w:] == -np.inf) and np.all(ti[w:] == -1)
    lookup = dict(zip(i.tolist(), s.tolist()))
    assert all(lookup[int(a)] == b for a, b in zip(ti[:w], ts[:w]))
    ts, ti = s.copy(), i.copy()
    K.select_first(ts, ti, fill, k)
    assert set(ti[:k].tolist()) == ref and ts[k - 1] == kth


def test_exp_into_accuracy(rng):
    """Catches a wrong polynomial, range reduction or exponent scaling of the vectorised
    exp: against numpy's exp. Relative error about 1e-16 * (1 + |t|) (the range reduction
    is reassociated for speed); 0 below -708; exp(0) = 1 exactly."""
    t = np.concatenate([-rng.exponential(3.0, 20000), rng.uniform(-708, 0, 20000),
                        [0.0, -1e-300, -708.0, -709.0, -1e4, -np.inf]])
    e = np.empty_like(t)
    K.exp_into(t, e, np.empty(t.shape, dtype=np.int64))
    ref = np.exp(t)
    ok = t > -708
    eps = np.finfo(np.float64).eps
    assert np.all(np.abs(e[ok] - ref[ok]) <= 4 * eps * (1 + np.abs(t[ok])) * ref[ok])
    assert np.all(e[~ok] == 0) and e[-6] == 1.0
