"""Poisson score, streaming posteriors, beta schedule and photon counts against direct references."""

import math

import numpy as np
import pytest

from spinifel.errors import DatasetError
from spinifel.orientation import likelihood
from spinifel.orientation.likelihood import (
    PosteriorState,
    _fold_top_k,
    beta_schedule,
    log_slices,
    photon_counts,
    poisson_scores,
    posterior_settings,
    score_orientations,
    update_fluence,
)

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def posterior_path(request, monkeypatch):
    """Every test here runs on both implementations of the streaming posterior: the numba
    passes (the CPU default) and the numpy passes (the array-module path cupy takes)."""
    if request.param == "compiled":
        pytest.importorskip("numba")
    monkeypatch.setattr(likelihood, "USE_COMPILED", request.param == "compiled")
    return request.param


def _batches(slices, batch):
    for a in range(0, len(slices), batch):
        yield a, slices[a:a + batch]


def _problem(rng, n=23, J=41, P=60, photons=3.0):
    """Random positive slices and Poisson images drawn from some of them (float32)."""
    slices = rng.gamma(0.7, 1.0, (J, P)).astype(np.float32)
    slices[:, :3] = 0.0  # pixels the model calls empty: exercise the floor
    truth = rng.integers(0, J, n)
    images = rng.poisson(photons * slices[truth] + 0.05).astype(np.float32)
    return images, slices


def _dense_scores(images, slices, floor_rel, fluence=None, fit_scale=False):
    """Double loop in float64 over the float32 inputs (independent of the GEMM code)."""
    n, J = images.shape[0], slices.shape[0]
    L = np.zeros((n, J))
    for j in range(J):
        w = slices[j].astype(np.float64)
        w = np.maximum(w, floor_rel * w.mean())
        S = w.sum()
        for k in range(n):
            x = images[k].astype(np.float64)
            L[k, j] = (x * np.log(w)).sum() - (x.sum() * math.log(S) if fit_scale
                                               else fluence[k] * S)
    return L


def _dense_posterior(L, beta, S):
    z = beta * L
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    H = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    return p, H, p @ S


@pytest.mark.parametrize("fit_scale", [False, True])
def test_score_equals_direct_loop(rng, fit_scale):
    """Catches a wrong GEMM operand, a missing/wrong fluence term or a floor on the wrong scale."""
    images, slices = _problem(rng)
    fluence = rng.uniform(0.5, 2.0, images.shape[0])
    log_w, sums = log_slices(slices, 1e-3)
    got = poisson_scores(images, log_w, sums, fluence=fluence, n_photons=images.sum(1, dtype=np.float64),
                         fit_scale=fit_scale)
    ref = _dense_scores(images, slices, 1e-3, fluence, fit_scale)
    # float32 log and GEMM: each term is off by eps |K log W|, summed over P pixels
    tol = 4 * EPS32 * slices.shape[1] * np.abs(log_w).max() * images.max(1)[:, None] + 1e-9
    assert np.all(np.abs(got - ref) <= tol)
    assert got.dtype == np.float64 and got.shape == (images.shape[0], slices.shape[0])


def test_posterior_matches_dense_softmax(rng):
    """Catches a wrong log-sum-exp, entropy, expected slice sum or mutual information."""
    images, slices = _problem(rng, photons=0.3)
    n, J = images.shape[0], slices.shape[0]
    fluence = rng.uniform(0.5, 2.0, n)
    beta = 0.3
    post = score_orientations(images, _batches(slices, 9), beta=beta, max_kept=J,
                              posterior_mass=1.0, fluence=fluence, image_batch=5)
    L = _dense_scores(images, slices, 1e-3, fluence)
    S = np.maximum(slices.astype(np.float64), 1e-3 * slices.mean(1, dtype=np.float64)[:, None]).sum(1)
    p, H, ES = _dense_posterior(L, beta, S)
    dense = np.zeros((n, J))
    np.put_along_axis(dense, np.where(post.indices >= 0, post.indices, 0), post.weights, 1)
    tol = 1e-4  # scores carry float32 GEMM error (see the test above); beta = 0.3 scales it
    assert np.allclose(dense, p, atol=tol)
    assert np.allclose(post.weights.sum(1), 1.0, atol=1e-12)
    assert np.all(np.diff(post.weights, axis=1) <= 0)  # best first
    assert np.allclose(post.entropy, H, atol=tol)
    assert np.allclose(post.expected_slice_sum, ES, rtol=tol)
    assert np.allclose(post.mutual_information(), np.log(J) - H, atol=tol)
    assert np.allclose(post.log_likelihood, L.max(1), rtol=1e-5)
    assert post.n_orientations == J and post.mean_slice_sum == pytest.approx(S.mean())
    # the orientation average of the (unclipped) slices, accumulated in the clip's pass
    assert np.allclose(post.mean_slice, slices.astype(np.float64).mean(axis=0),
                       rtol=8 * J * EPS32)
    assert np.allclose(update_fluence(images.sum(1, dtype=np.float64), post.expected_slice_sum),
                       images.sum(1) / ES, rtol=tol)


@pytest.mark.parametrize("batch,image_batch", [(1, 1), (4, 7), (13, 100), (41, 2)])
def test_streaming_equals_unbatched(rng, batch, image_batch):
    """Catches a running max/sum rescaled wrongly across batches or a top-k merge losing candidates."""
    images, slices = _problem(rng, photons=0.5)
    # float64: the GEMM's rounding then does not depend on its shape at the 1e-9 level,
    # so only the streaming arithmetic is compared
    images, slices = images.astype(np.float64), slices.astype(np.float64)
    fluence = np.ones(images.shape[0])
    kw = {"beta": 0.5, "max_kept": 6, "posterior_mass": 0.99, "fluence": fluence}
    ref = score_orientations(images, [(0, slices)], image_batch=10_000, **kw)
    got = score_orientations(images, _batches(slices, batch), image_batch=image_batch, **kw)
    assert np.array_equal(got.indices, ref.indices)
    assert np.array_equal(got.n_kept, ref.n_kept)
    for f in ("weights", "entropy", "expected_slice_sum", "dropped_mass", "log_likelihood"):
        assert np.allclose(getattr(got, f), getattr(ref, f), rtol=1e-9, atol=1e-12), f


@pytest.mark.parametrize("k,batch", [(3, 1), (3, 4), (3, 7), (8, 5), (8, 40), (8, 17)])
def test_buffered_top_k_holds_the_k_largest(rng, k, batch):
    """Catches the streaming top-k buffer losing an entry: a compaction that keeps fewer than
    k, a wrong fill count after a whole-batch merge (batch > 2k), an append at the wrong
    position. Brute force: the k largest of all scores by a full sort."""
    n, J = 30, 120
    scores = rng.normal(size=(n, J))
    scores[:, ::7] = scores[:, 3:4]  # some exact ties inside a row: a tie is kept or not
    top_s = np.full((n, 2 * k), -np.inf)
    top_i = np.full((n, 2 * k), -1, dtype=np.int64)
    fill, bar = np.zeros(n, dtype=np.int64), np.full(n, -np.inf)
    for a in range(0, J, batch):
        _fold_top_k(top_s, top_i, fill, bar, scores[:, a:a + batch], a, k)
        assert np.all(fill <= 2 * k)
        # the buffer holds exactly its fill entries, each with its own score
        assert np.all(np.isfinite(top_s) == (np.arange(2 * k)[None, :] < fill[:, None]))
        ok = top_i >= 0
        assert np.array_equal(top_s[ok], scores[np.nonzero(ok)[0], top_i[ok]])
    kth = -np.sort(-scores, axis=1)[:, k - 1]
    for i in range(n):
        kept = top_s[i][np.isfinite(top_s[i])]
        # every score above the k-th largest is in the buffer, and the k-th value itself
        assert np.sum(kept > kth[i]) == np.sum(scores[i] > kth[i])
        assert np.sum(kept >= kth[i]) >= k
        assert len(set(top_i[i][top_i[i] >= 0])) == fill[i]  # no orientation twice


@pytest.mark.parametrize("beta,mass", [(0.05, 0.99), (1.0, 0.999), (1.0, 0.9)])
def test_pruning_never_changes_the_posterior(rng, beta, mass):
    """Catches the pruning of improbable scores (``n_orientations`` given) dropping an
    orientation that the posterior keeps, or shifting the running sums: with and without
    it the posteriors are identical, while it does prune (counted through the top-k)."""
    images, slices = _problem(rng, n=40, J=200, P=80, photons=20.0)
    images, slices = images.astype(np.float64), slices.astype(np.float64)
    kw = {"beta": beta, "max_kept": 32, "posterior_mass": mass, "fit_scale": True}
    ref = score_orientations(images, _batches(slices, 16), **kw)
    got = score_orientations(images, _batches(slices, 16), n_orientations=200, **kw)
    for f in ("indices", "n_kept", "weights", "entropy", "expected_slice_sum", "dropped_mass",
              "log_likelihood"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f
    # at beta 1 most orientations are below the pruning bar: the filter is exercised
    st = PosteriorState.empty(40, 32, 1.0, posterior_mass=0.999, n_orientations=200)
    assert np.isfinite(st.log_never_kept)


def test_sparsification_keeps_smallest_set_reaching_mass(rng):
    """Catches an off-by-one in the kept count, a wrong renormalisation or dropped mass."""
    n, J, k, mass = 50, 30, 8, 0.9
    L = rng.normal(0, 2.0, (n, J))
    st = PosteriorState.empty(n, k, 1.0)
    st.update(L[:, :17], 0, np.ones(17))
    st.update(L[:, 17:], 17, np.ones(J - 17))
    post = st.finalize(mass, np.ones(n))
    p = np.exp(L - L.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, axis=1)
    ps = np.take_along_axis(p, order, 1)
    cum = np.cumsum(ps, 1)
    for i in range(n):
        m = min(int(np.searchsorted(cum[i], mass) + 1), k)  # smallest prefix with mass >= target
        assert post.n_kept[i] == m
        assert np.array_equal(post.indices[i, :m], order[i, :m])
        assert np.all(post.indices[i, m:] == -1) and np.all(post.weights[i, m:] == 0)
        assert np.allclose(post.weights[i, :m], ps[i, :m] / cum[i, m - 1], rtol=1e-12)
        assert post.dropped_mass[i] == pytest.approx(1 - cum[i, m - 1], abs=1e-12)
        if m < k:
            assert cum[i, m - 1] >= mass and (m == 1 or cum[i, m - 2] < mass)


def test_hard_assignment_is_argmax_with_ties_to_lower_index(rng):
    """Catches k = 1 not reproducing argmax L (ties must go to the lower orientation index)."""
    images, slices = _problem(rng)
    slices = np.concatenate([slices, slices[::-1]])  # every score appears twice: exact ties
    fluence = rng.uniform(0.5, 2.0, images.shape[0])
    post = score_orientations(images, reversed(list(_batches(slices, 7))), beta=1.0, max_kept=1,
                              posterior_mass=0.999, fluence=fluence, image_batch=4)
    log_w, sums = log_slices(slices)
    L = poisson_scores(images, log_w, sums, fluence=fluence)
    assert np.array_equal(post.indices[:, 0], L.argmax(1))
    assert np.all(post.weights[:, 0] == 1.0) and np.all(post.n_kept == 1)


def test_top_k_ties_go_to_the_lower_index(rng):
    """Catches the kept orientations of k > 1 not in (descending score, ascending index)
    order when scores tie exactly (a grid with repeated slices): the brute force is a
    lexicographic sort of the dense scores."""
    images, slices = _problem(rng)
    slices = np.concatenate([slices, slices[::-1]])  # every score appears twice: exact ties
    fluence = rng.uniform(0.5, 2.0, images.shape[0])
    k = 6
    post = score_orientations(images, reversed(list(_batches(slices, 7))), beta=1e-3,
                              max_kept=k, posterior_mass=1.0, fluence=fluence, image_batch=4)
    log_w, sums = log_slices(slices)
    L = poisson_scores(images, log_w, sums, fluence=fluence)
    J = L.shape[1]
    ref = np.lexsort((np.broadcast_to(np.arange(J), L.shape), -L), axis=1)[:, :k]
    assert np.array_equal(post.indices, ref)


def test_beta_schedule_geometric_ramp():
    """Catches a linear instead of geometric ramp, a wrong end point or the auto ramp length."""
    b = [beta_schedule(g, 16, 1e-3, 1.0, 0) for g in range(16)]
    ramp = round(0.75 * 15)
    assert b[1] == pytest.approx(1e-3) and b[0] == pytest.approx(1e-3)
    assert b[ramp] == 1.0 and all(v == 1.0 for v in b[ramp:])
    ratios = [b[g + 1] / b[g] for g in range(1, ramp)]
    assert np.allclose(ratios, 1e3 ** (1 / (ramp - 1)))
    assert beta_schedule(3, 10, 0.1, 1.0, 5) == pytest.approx(0.1 * 10 ** 0.5)


def test_photon_counts_policy():
    """Catches refusing integer counts, accepting non-counts, or a wrong ADU rounding."""
    x = np.array([[0, 1, 2, 5]], dtype=np.float32)
    assert np.array_equal(photon_counts(x, 0.0, "f.h5"), x)
    adu = np.array([[0.2, 9.8, 20.4, -3.0]], dtype=np.float32)  # 10 ADU per photon
    assert np.array_equal(photon_counts(adu, 10.0, "f.h5"), [[0, 1, 2, 0]])
    with pytest.raises(DatasetError, match=r"f\.h5:images: non-integer values .*adu_per_photon"):
        photon_counts(np.array([[0.37, 1.0]], np.float32), 0.0, "f.h5")
    with pytest.raises(DatasetError, match="negative value"):
        photon_counts(np.array([[-1.0, 1.0]], np.float32), 0.0, "f.h5")
    with pytest.raises(DatasetError, match="below -0.5"):
        photon_counts(np.array([[-8.0, 1.0]], np.float32), 10.0, "f.h5")
    with pytest.raises(DatasetError, match="non-finite"):
        photon_counts(np.array([[np.nan, 1.0]], np.float32), 0.0, "f.h5")


def test_config_keys_validated():
    """Catches a Poisson key accepted out of range, an unknown score accepted or settings mis-read."""
    from spinifel.config import load_config
    from spinifel.errors import ConfigError

    cfg = load_config(None, ["algorithm.score=poisson", "data.adu_per_photon=12.5"])
    assert cfg.algorithm.score == "poisson" and cfg.data.adu_per_photon == 12.5
    kw = posterior_settings(load_config(None, ["algorithm.generations=9",
                                               "algorithm.beta_start=0.04"]).algorithm, 1)
    assert kw["beta"] == pytest.approx(0.04) and kw["fit_scale"] is True
    assert kw["max_kept"] == 512 and kw["posterior_mass"] == 0.999 and kw["floor_rel"] == 1e-3
    for bad, key in (("algorithm.score=gauss", "algorithm.score"),
                     ("algorithm.posterior_mass=0", "algorithm.posterior_mass"),
                     ("algorithm.beta_start=2", "algorithm.beta_start"),
                     ("algorithm.fluence=none", "algorithm.fluence"),
                     ("data.adu_per_photon=-1", "data.adu_per_photon")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


def test_cap_larger_than_grid(rng):
    """Catches unfilled top-k slots (fewer orientations than the cap) kept with weight > 0."""
    images, slices = _problem(rng, J=5)
    post = score_orientations(images, _batches(slices, 2), beta=0.01, max_kept=8,
                              posterior_mass=1.0, fluence=np.ones(images.shape[0]))
    assert np.all(post.n_kept == 5) and np.all(post.indices[:, 5:] == -1)
    assert np.all(post.weights[:, 5:] == 0) and np.allclose(post.weights.sum(1), 1.0)
    assert np.all(np.sort(post.indices[:, :5], axis=1) == np.arange(5))


def test_posterior_metrics_equal_direct_computation(rng):
    """Catches a metric divided by the wrong count, a sum where a max is due (kept max), a
    wrong key, or the information rate not ``log J - H``: two "ranks" of posteriors
    reduced like the integrator does (sums, max of ``*_max``) against direct means over
    all images of a dense softmax."""
    from spinifel.orientation.likelihood import posterior_metrics
    from spinifel.parallel.collectives import reduce_summary
    from spinifel.parallel.context import SerialComm

    images, slices = _problem(rng, n=30, J=41, photons=0.3)
    images = images.astype(np.float64)
    phi = rng.uniform(0.5, 2.0, 30)
    beta, mass = 0.5, 0.9
    parts = [score_orientations(images[a:b], _batches(slices, 16), beta=beta, max_kept=12,
                                posterior_mass=mass, fluence=phi[a:b], floor_rel=1e-3)
             for a, b in ((0, 11), (11, 30))]
    sums = [reduce_summary(SerialComm(), p.summary()) for p in parts]
    total = {k: sums[0][k] + sums[1][k] for k in sums[0] if not k.endswith("_max")}
    total["n_kept_max"] = max(s["n_kept_max"] for s in sums)
    got = posterior_metrics(total, beta)

    L = _dense_scores(images, slices, 1e-3, fluence=phi)
    S = np.maximum(slices.astype(np.float64), 1e-3 * slices.mean(1, keepdims=True)).sum(1)
    p, H, _ = _dense_posterior(L, beta, S)
    srt = -np.sort(-p, axis=1)[:, :12]
    cum = np.cumsum(srt, axis=1)
    kept = np.minimum((cum[:, :-1] < mass).sum(1) + 1, 12)
    dropped = 1 - np.array([srt[i, :kept[i]].sum() for i in range(30)])
    want = {"log_likelihood": L.max(1).mean(), "entropy": H.mean(),
            "mutual_information": (math.log(41) - H).mean(), "beta": beta,
            "orientations_kept_mean": kept.mean(), "orientations_kept_max": kept.max(),
            "dropped_mass": dropped.mean(), "fluence": phi.mean(), "n_images": 30}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    assert got["orientations_kept_max"] > got["orientations_kept_mean"]  # the max is a max


@pytest.mark.mpi(min_size=2)
def test_reduce_summary_sums_and_maxes_over_ranks():
    """Catches ``n_kept_max`` summed over ranks instead of maximised, or a sum left local."""
    from mpi4py import MPI

    from spinifel.parallel.collectives import reduce_summary

    comm = MPI.COMM_WORLD
    r, size = comm.Get_rank(), comm.Get_size()
    got = reduce_summary(comm, {"n": float(r + 1), "entropy": 0.5 * r, "n_kept_max": float(r + 3)})
    assert got == {"n": size * (size + 1) / 2, "entropy": 0.25 * size * (size - 1),
                   "n_kept_max": float(size + 2)}


@pytest.mark.parametrize("fit_scale", [False, True])
def test_candidate_log_likelihood_equals_direct_loop(rng, fit_scale):
    """Catches the per-image candidate score (local refinement) pairing an image with another
    image's candidates, or differing from the grid score's floor/fluence terms."""
    from spinifel.orientation.likelihood import candidate_log_likelihood

    images, slices = _problem(rng, n=7, J=7 * 5)
    fluence = rng.uniform(0.5, 2.0, 7)
    got = candidate_log_likelihood(images, slices, 5, fluence=fluence, fit_scale=fit_scale,
                                   floor_rel=1e-3)
    full = _dense_scores(images, slices, 1e-3, fluence, fit_scale)  # every image x every slice
    ref = np.stack([full[i, 5 * i:5 * i + 5] for i in range(7)])
    # float64 throughout: round-off of sums of P terms of size |K log W|
    tol = 16 * np.finfo(np.float64).eps * slices.shape[1] * np.abs(full).max()
    assert got.shape == (7, 5) and np.allclose(got, ref, rtol=0, atol=tol)
    # a background is added to the slices before the floor and the log, as in the grid score
    bg = rng.uniform(0.0, 0.2, slices.shape[1])
    got_bg = candidate_log_likelihood(images, slices, 5, fluence=fluence, fit_scale=fit_scale,
                                      floor_rel=1e-3, background_per_fluence=bg)
    full_bg = _dense_scores(images, (slices + bg).astype(np.float64), 1e-3, fluence, fit_scale)
    assert np.allclose(got_bg, np.stack([full_bg[i, 5 * i:5 * i + 5] for i in range(7)]),
                       rtol=0, atol=tol)


def test_likelihood_refinement_finds_off_grid_orientation(rng):
    """Catches local refinement under the Poisson score moving away from the likelihood's
    maximum (a sign error: it would minimise L) or ignoring the counts: Poisson images of an
    asymmetric model, most likely grid orientation, then 4 rounds maximising L. The refined
    orientations must be several times closer to the truth than the grid's, and L never
    lower than at the start."""
    from helpers import blob_slicer
    from spinifel.geometry.orientations import (
        angle_between,
        grid_spacing,
        multiply,
        orientation_grid,
        random_quaternions,
    )
    from spinifel.orientation.likelihood import candidate_log_likelihood
    from spinifel.orientation.matching import refine_orientations

    slicer = blob_slicer()
    grid = orientation_grid(500)
    truth = random_quaternions(30, rng)
    expected = slicer.slices(truth)
    expected = np.maximum(expected, 0) * (2e5 / np.maximum(expected, 0).sum(1, keepdims=True))
    images = rng.poisson(expected).astype(np.float64)  # ~2e5 photons: the score is sharp
    post = score_orientations(images, _batches(slicer.slices(grid), 100), beta=1.0,
                              max_kept=1, posterior_mass=1.0, fit_scale=True)
    start = grid[post.indices[:, 0]]

    def minus_l(rows, sl, k):
        return -candidate_log_likelihood(images[rows], sl, k, fit_scale=True)

    q, d = refine_orientations(images, start, slicer, 0.5 * grid_spacing(500), 4,
                               scorer=minus_l)
    flip = np.array([0.0, 0.0, 0.0, 1.0])  # the model hardly tells q from q turned by pi

    def err(x):
        return np.minimum(angle_between(x, truth), angle_between(x, multiply(truth, flip)))

    l_start = candidate_log_likelihood(images, slicer.slices(start), 1, fit_scale=True)[:, 0]
    assert np.all(-d >= l_start - 1e-9 * np.abs(l_start))
    assert np.allclose(-d, candidate_log_likelihood(images, slicer.slices(q), 1,
                                                    fit_scale=True)[:, 0], rtol=1e-9)
    print("median error", np.median(err(start)), "->", np.median(err(q)))
    assert np.median(err(q)) < 0.25 * np.median(err(start))
