"""Quaternion algebra and the orientation grid."""

import numpy as np
import pytest

from spinifel.geometry import orientations as o


def test_matrix_is_rotation_and_round_trips(rng):
    q = o.random_quaternions(50, rng)
    r = o.quaternion_to_matrix(q)
    eye = np.einsum("nij,nkj->nik", r, r)
    assert np.abs(eye - np.eye(3)).max() < 1e-14
    assert np.abs(np.linalg.det(r) - 1).max() < 1e-14
    assert np.abs(o.matrix_to_quaternion(r) - o.canonical(q)).max() < 1e-12


def test_quaternion_matches_axis_angle():
    # 90 degrees about z maps x to y (active rotation)
    q = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    r = o.quaternion_to_matrix(q)
    assert np.allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-15)


def test_product_composes_rotations(rng):
    a, b = o.random_quaternions(2, rng)
    lhs = o.quaternion_to_matrix(o.multiply(a, b))
    rhs = o.quaternion_to_matrix(a) @ o.quaternion_to_matrix(b)
    assert np.abs(lhs - rhs).max() < 1e-14
    assert o.angle_between(a, a) == pytest.approx(0, abs=1e-7)
    assert o.angle_between(a, -a) == pytest.approx(0, abs=1e-7)


def test_grid_is_near_uniform():
    n = 2000
    g = o.orientation_grid(n)
    assert g.shape == (n, 4)
    assert np.allclose(np.linalg.norm(g, axis=1), 1)
    assert (g[:, 0] >= 0).all()
    d = np.abs(g @ g.T)
    np.fill_diagonal(d, 0)
    nn = 2 * np.arccos(np.clip(d.max(axis=1), 0, 1))
    spacing = o.grid_spacing(n)
    # no two grid points nearly coincide, and none is isolated
    assert nn.min() > 0.5 * spacing
    assert nn.max() < 1.2 * spacing
    # random rotations are never far from the grid (covering radius)
    rq = o.random_quaternions(5000, np.random.default_rng(1))
    cover = 2 * np.arccos(np.clip(np.abs(rq @ g.T).max(axis=1), 0, 1))
    assert cover.max() < 1.2 * spacing


def test_random_quaternions_are_haar_uniform():
    q = o.random_quaternions(200000, np.random.default_rng(5))
    # rotation angle of Haar-random rotations has density (1 - cos t) / pi on [0, pi]
    t = 2 * np.arccos(np.clip(np.abs(q[:, 0]), 0, 1))
    hist, edges = np.histogram(t, bins=10, range=(0, np.pi))
    expect = np.diff(edges - np.sin(edges)) / np.pi * len(t)
    assert np.all(np.abs(hist - expect) < 5 * np.sqrt(expect) + 5)
