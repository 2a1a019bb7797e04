"""Coarse-to-fine orientation search against brute force and against exhaustive matching."""

import numpy as np
import pytest

from spinifel.geometry.orientations import (
    angle_between,
    grid_spacing,
    multiply,
    orientation_grid,
    random_quaternions,
)
from spinifel.orientation.coarse_to_fine import (
    coarse_pixel_selection,
    grid_neighbours,
    match_coarse_to_fine,
    search_grids,
    search_lists,
    top_k_matches,
    twin_axis,
    twin_rotation,
)
from spinifel.orientation.matching import match_orientations
from spinifel.orientation.slicing import Slicer
from spinifel.phasing.algorithms import autocorrelation_from_density


def _batches(slices, batch):
    for a in range(0, len(slices), batch):
        yield a, slices[a:a + batch]


def _brute_neighbours(coarse, fine, radius):
    ang = angle_between(coarse[:, None, :], fine[None, :, :])  # elementwise, no GEMM
    return [np.flatnonzero(row <= radius) for row in ang]


def test_neighbour_lists_brute_force(rng):
    coarse = orientation_grid(60)
    # random signs: q and -q are the same rotation and must give the same neighbours
    fine = random_quaternions(700, rng) * rng.choice([-1.0, 1.0], (700, 1))
    radius = 1.25 * grid_spacing(60)
    indptr, indices = grid_neighbours(coarse, fine, radius, block=7)
    ref = _brute_neighbours(coarse, fine, radius)
    assert len(indptr) == 61 and indptr[-1] == len(indices)
    for c in range(60):
        assert np.array_equal(indices[indptr[c]:indptr[c + 1]], ref[c])
    assert sum(len(r) for r in ref) > 60  # not trivially empty
    # twin rows: the neighbours of the half turn of each coarse orientation about an axis
    axis = np.array([0.3, -0.2, 0.9]) / np.linalg.norm([0.3, -0.2, 0.9])
    indptr2, indices2 = search_lists(coarse, fine, radius, axis)
    twin = multiply(coarse, np.concatenate([[0.0], axis]))
    ref_twin = _brute_neighbours(twin, fine, radius)
    assert len(indptr2) == 121
    for c in range(60):
        assert np.array_equal(indices2[indptr2[c]:indptr2[c + 1]], ref[c])
        assert np.array_equal(indices2[indptr2[60 + c]:indptr2[61 + c]], ref_twin[c])


def test_twin_is_friedel_mate_on_a_flat_detector(rng):
    # pixels in a tilted plane through the origin: the fitted axis is its normal, and the
    # half turn about it gives the same image (centrosymmetric intensity), to NUFFT accuracy
    normal = np.array([0.2, 0.1, 1.0]) / np.linalg.norm([0.2, 0.1, 1.0])
    u = np.cross(normal, [1.0, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    g = np.linspace(-1, 1, 9)
    a, b = np.meshgrid(g, g, indexing="ij")
    s = (u[:, None] * a.ravel() + v[:, None] * b.ravel()) * 1e9
    assert np.allclose(twin_axis(s), normal, atol=1e-12)
    x = rng.uniform(0, 1, (15, 15, 15))
    ac = autocorrelation_from_density(x)
    slicer = Slicer(ac, s, np.linalg.norm(s, axis=0).max(), eps=1e-10, dtype=np.float64)
    q = random_quaternions(5, rng)
    same = slicer.slices(q)
    twin = slicer.slices(multiply(q, twin_rotation(normal)[None, :]))
    assert np.abs(twin - same).max() <= 1e-8 * np.abs(same).max()
    other = slicer.slices(multiply(q, np.array([[np.cos(0.3), *(np.sin(0.3) * normal)]])))
    assert np.abs(other - same).max() > 1e-2 * np.abs(same).max()  # not trivially equal


@pytest.mark.parametrize("scale,transform", [(False, "none"), (True, "none"), (True, "sqrt")])
def test_top_k_against_sorted_brute_force(rng, scale, transform):
    n, B, P, k = 31, 47, 12, 5
    # integer values in float64: every dot product is exact, so duplicated slices tie
    # exactly and the tie rule (lower index first) is tested
    images = rng.integers(0, 5, (n, P)).astype(np.float64)
    slices = rng.integers(0, 5, (B, P)).astype(np.float64)
    slices[30] = slices[4]
    slices[41] = slices[4]
    slices[17] = slices[9]
    x = np.sqrt(images) if transform == "sqrt" else images
    y = np.sqrt(slices) if transform == "sqrt" else slices
    if scale:
        c = np.maximum(x @ y.T, 0) / (y ** 2).sum(1)
        d = ((x[:, None, :] - c[:, :, None] * y[None]) ** 2).sum(-1)
    else:
        d = ((x[:, None, :] - y[None]) ** 2).sum(-1)
    idx = np.broadcast_to(np.arange(B), d.shape)
    order = np.lexsort((idx, np.round(d, 9)), axis=-1)[:, :k]
    top = top_k_matches(images, _batches(slices, 6), k, scale, image_batch=8, transform=transform)
    assert np.array_equal(top.index, order)
    assert np.allclose(top.dist, np.take_along_axis(d, order, 1), rtol=1e-12, atol=1e-9)
    # k = 1 is exhaustive matching
    one = top_k_matches(images, _batches(slices, 11), 1, scale, transform=transform)
    st = match_orientations(images, _batches(slices, 11), scale, transform=transform)
    assert np.array_equal(one.index[:, 0], st.best_index)


def _problem(rng, n_images):
    """A random smooth asymmetric object, a curved detector, noisy images at random orientations."""
    M = 21
    idx = np.indices((M, M, M)) - (M - 1) / 2
    x = np.zeros((M, M, M))
    for c in np.random.default_rng(5).uniform(-4, 4, (10, 3)):
        x += np.exp(-((idx - c[:, None, None, None]) ** 2).sum(0) / 1.5)
    ac = autocorrelation_from_density(x)
    g = np.linspace(-1, 1, 16)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    s = np.stack([gx.ravel(), gy.ravel(), 0.4 * (gx.ravel() ** 2 + gy.ravel() ** 2)]) * 1e9
    extent = np.linalg.norm(s, axis=0).max()
    slicer = Slicer(ac, s, extent, eps=1e-8, dtype=np.float64)
    q = random_quaternions(n_images, rng)
    clean = np.maximum(slicer.slices(q), 0)
    images = rng.poisson(clean * (2e4 / clean.sum(1, keepdims=True))).astype(np.float64)
    return ac, s, extent, slicer, images


def test_coarse_to_fine_agrees_with_exhaustive(rng):
    n_images, n_fine, n_coarse, k, radius = 200, 4000, 500, 2, 1.25
    ac, s, extent, slicer, images = _problem(rng, n_images)
    axis = twin_axis(s)
    fine, coarse, indptr, indices = search_grids(n_fine, n_coarse, radius, tuple(axis))
    cpix = coarse_pixel_selection(s, 0.5)
    cslicer = Slicer(ac, s[:, cpix], extent, eps=1e-8, dtype=np.float64)
    exh = match_orientations(images, slicer.iter_batches(fine, 500), True, transform="sqrt")
    st, stats = match_coarse_to_fine(images, slicer, cslicer, cpix, fine, coarse, indptr, indices,
                                     k, 500, True, transform="sqrt", twins=True)
    agree = np.mean(st.best_index == exh.best_index)
    assert agree >= 0.95, agree

    # the count, independently: the coarse top-k (brute-force neighbour lists) per image
    top = top_k_matches(images[:, cpix], cslicer.iter_batches(coarse, 500), k, True,
                        transform="sqrt")
    r = radius * grid_spacing(n_coarse)
    nbr = _brute_neighbours(coarse, fine, r)
    nbr += _brute_neighbours(multiply(coarse, np.concatenate([[0.0], axis])), fine, r)
    cand = np.concatenate([top.index, top.index + n_coarse], axis=1)  # candidates and twins
    expected = n_images * n_coarse + sum(len(nbr[c]) for c in cand.ravel())
    assert stats.coarse_evaluations == n_images * n_coarse
    assert stats.evaluations == expected
    assert stats.exhaustive_evaluations == n_images * n_fine
    assert n_images * n_fine / expected >= 5.0

    # the fine pass is exact on its search set: the brute-force argmin over the union of
    # the candidates' neighbour lists (ties to the lower index)
    d = np.sqrt(images)
    y = np.sqrt(np.maximum(slicer.slices(fine), 0))
    cross = np.maximum(d @ y.T, 0)
    dist = (d * d).sum(1)[:, None] - cross ** 2 / (y * y).sum(1)[None]
    for i in range(n_images):
        pool = np.unique(np.concatenate([nbr[c] for c in cand[i]]))
        assert st.best_index[i] == pool[np.argmin(dist[i, pool])]
        assert st.best_dist[i] == pytest.approx(dist[i, st.best_index[i]], rel=1e-9)

    # nothing depends on the batch sizes
    st2, stats2 = match_coarse_to_fine(images, slicer, cslicer, cpix, fine, coarse, indptr, indices,
                                       k, 97, True, image_batch=13, transform="sqrt", twins=True)
    assert np.array_equal(st2.best_index, st.best_index)
    assert stats2.evaluations == stats.evaluations

    # nor on the cap of fine slices held at once: chunks give the same answer and never
    # hold more than the cap (each chunk's slices are counted in fine_sliced)
    cap = stats.fine_sliced // 5
    st3, stats3 = match_coarse_to_fine(images, slicer, cslicer, cpix, fine, coarse, indptr,
                                       indices, k, 500, True, transform="sqrt", twins=True,
                                       max_fine_slices=cap)
    assert np.array_equal(st3.best_index, st.best_index)
    assert np.array_equal(st3.best_dist, st.best_dist)
    assert stats3.evaluations == stats.evaluations
    assert stats3.fine_sliced > stats.fine_sliced  # some slices computed twice
    print("fine slices computed:", stats.fine_sliced, "->", stats3.fine_sliced, "with cap", cap)


def test_config_refuses_distributed_coarse_to_fine():
    from spinifel.config import load_config
    from spinifel.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm.search"):
        load_config(None, ["algorithm.search=coarse_to_fine", "algorithm.matching_mode=distributed"])
    with pytest.raises(ConfigError, match="coarse_candidates"):
        load_config(None, ["algorithm.n_orientations=100", "algorithm.coarse_candidates=13"])
    cfg = load_config(None, ["algorithm.search=coarse_to_fine"])
    assert cfg.algorithm.search == "coarse_to_fine"


def test_pipeline_runs_coarse_to_fine(tmp_path, caplog):
    import logging

    import h5py

    from spinifel.config import load_config
    from spinifel.parallel.context import ParallelContext
    from spinifel.pipeline import run_pipeline
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    data = tmp_path / "tiny.h5"
    simulate_dataset(data, builtin_molecule(seed=0, n_atoms=300), n_images=60, n_pixels=16,
                     pixel_size_m=6e-3, M=25, seed=0, beamstop_radius_px=1.0)
    algo = {"M": 25, "generations": 2, "n_orientations": 1000, "n_phase_loops": 1, "n_er": 5,
            "n_hio": 5, "n_final_er": 5, "refine_generations": 0, "lambdas": [1e-1],
            "cg_max_iter": 10, "search": "coarse_to_fine"}
    cfg = load_config(None, (), {"algorithm": algo, "data": {"path": str(data)},
                                 "output": {"dir": str(tmp_path / "out")}})
    with caplog.at_level(logging.INFO, logger="spinifel"):
        run_pipeline(cfg, ParallelContext.serial())
    # 60 images x 1000 fine orientations exhaustively; the coarse pass alone is 60 x 125
    line = [r.getMessage() for r in caplog.records if "coarse-to-fine search" in r.getMessage()]
    assert len(line) == 1
    n_eval = int(line[0].split(":")[1].split()[0])
    assert 60 * 125 < n_eval < 60 * 1000
    # every matched orientation is a point of the fine grid
    with h5py.File(tmp_path / "out" / "result.h5") as f:
        q = f["orientations"][()]
    fine = orientation_grid(1000)
    assert np.allclose(np.abs(q @ fine.T).max(axis=1), 1.0, atol=1e-12)


def test_dry_run_memory_estimate_counts_the_fine_slices():
    """Coarse-to-fine holds the fine slices its candidates need (up to the whole grid)."""
    from spinifel.config import load_config
    from spinifel.pipeline import _memory_estimate

    base = {"algorithm": {"n_orientations": 20000}}
    ex = _memory_estimate(load_config(None, (), base), 1000, 4096)
    for cap, held in ((0, 20000), (10000, 10000)):
        c2f = _memory_estimate(load_config(None, (), {"algorithm": {
            "n_orientations": 20000, "search": "coarse_to_fine",
            "coarse_max_fine_slices": cap}}), 1000, 4096)
        assert c2f - ex == held * 4096 * 4


def test_chunks_respect_the_cap_and_cover_every_row():
    from spinifel.orientation.coarse_to_fine import _chunks

    fine, coarse, indptr, indices = search_grids(3000, 375, 1.25, None)
    rows = np.arange(len(coarse))
    cap = 400
    chunks = _chunks(rows, indptr, indices, fine, cap)
    assert np.array_equal(np.sort(np.concatenate(chunks)), rows)
    for ch in chunks:
        held = np.unique(np.concatenate([indices[indptr[c]:indptr[c + 1]] for c in ch]))
        assert len(held) <= cap or len(ch) == 1
    assert len(_chunks(rows, indptr, indices, fine, 0)) == 1
