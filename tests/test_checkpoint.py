"""Checkpoint/restart: a run interrupted after any generation and resumed gives the same result."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from spinifel.config import load_config
from spinifel.errors import CheckpointError
from spinifel.parallel.context import ParallelContext
from spinifel.pipeline import FAULT_VARIABLE, InjectedFault, run_pipeline
from spinifel.simulate.dataset import simulate_dataset
from spinifel.simulate.structure import builtin_molecule

BIN = Path(sys.executable).parent
ALGO = {"M": 21, "generations": 4, "n_orientations": 200, "n_phase_loops": 2, "n_er": 8,
        "n_hio": 8, "n_final_er": 8, "refine_generations": 1, "lambdas": [1e-2, 1e-1, 1.0],
        "cg_max_iter": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "d.h5"
    simulate_dataset(path, builtin_molecule(seed=1, n_atoms=200), n_images=80, n_pixels=12,
                     pixel_size_m=8e-3, M=21, seed=3)
    return path


def _cfg(data, out, **algo):
    a = dict(ALGO, **algo)
    return load_config(None, (), {"algorithm": a, "data": {"path": str(data)},
                                  "output": {"dir": str(out)}})


def _result(out):
    with h5py.File(Path(out) / "result.h5") as f:
        return {k: f[k][()] for k in ("density", "autocorrelation", "orientations", "support")}


def _assert_same(a, b):
    for k in a:
        scale = max(np.abs(a[k]).max(), 1e-30)
        assert np.abs(a[k].astype(float) - b[k].astype(float)).max() <= 1e-6 * scale, k


def test_resume_after_fault_equals_uninterrupted(data, tmp_path, monkeypatch):
    ctx = ParallelContext.serial()
    run_pipeline(_cfg(data, tmp_path / "full"), ctx)
    out = tmp_path / "cut"
    monkeypatch.setenv(FAULT_VARIABLE, "1")
    with pytest.raises(InjectedFault):
        run_pipeline(_cfg(data, out), ctx)
    monkeypatch.delenv(FAULT_VARIABLE)
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["generation"] == 1
    summary = run_pipeline(_cfg(data, out), ctx, resume=True)
    assert summary["generations"] == 4
    _assert_same(_result(tmp_path / "full"), _result(out))
    m = json.loads((out / "metrics.json").read_text())
    assert [g["generation"] for g in m["generations"]] == [0, 1, 2, 3]


def test_checkpoint_of_other_config_is_refused(data, tmp_path, monkeypatch):
    ctx = ParallelContext.serial()
    out = tmp_path / "o"
    monkeypatch.setenv(FAULT_VARIABLE, "0")
    with pytest.raises(InjectedFault):
        run_pipeline(_cfg(data, out), ctx)
    monkeypatch.delenv(FAULT_VARIABLE)
    with pytest.raises(CheckpointError, match="refusing to resume"):
        run_pipeline(_cfg(data, out, n_orientations=300), ctx, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_pipeline(_cfg(data, tmp_path / "empty"), ctx, resume=True)


def test_a_finished_run_can_be_extended(data, tmp_path):
    """Raising algorithm.generations and resuming continues a finished run."""
    ctx = ParallelContext.serial()
    out = tmp_path / "o"
    run_pipeline(_cfg(data, out, generations=2), ctx)
    summary = run_pipeline(_cfg(data, out, generations=3), ctx, resume=True)
    assert summary["generations"] == 3
    m = json.loads((out / "metrics.json").read_text())
    assert [g["generation"] for g in m["generations"]] == [0, 1, 2]


def _mpirun(n, data, out, extra=(), env=None, timeout=120):
    cmd = [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-m", "spinifel", "run",
           "--out", str(out), "--set", f"data.path={data}", *extra]
    for k, v in ALGO.items():
        cmd += ["--set", f"algorithm.{k}={json.dumps(v)}"]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    return r, time.monotonic() - t


@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="no mpiexec beside this python")
def test_killed_rank_ends_job_and_resume_matches(data, tmp_path):
    """SIGKILL one rank mid-run: the job ends non-zero within 30 s; resuming gives the same result."""
    full, _ = _mpirun(2, data, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    cut = tmp_path / "cut"
    r, seconds = _mpirun(2, data, cut, env={FAULT_VARIABLE: "1:1:kill"})
    assert r.returncode != 0
    assert seconds < 30
    # Whatever was being written at the kill is under a temporary name; every file under a
    # final name is complete.
    for name in ("checkpoint.h5", "result.h5"):
        with h5py.File(cut / name) as f:
            assert f.attrs["generation"] >= 0
    other = tmp_path / "cut_one_rank"
    shutil.copytree(cut, other)
    r2, _ = _mpirun(2, data, cut, extra=["--resume"])
    assert r2.returncode == 0, r2.stderr[-2000:]
    _assert_same(_result(tmp_path / "full"), _result(cut))
    assert not list(cut.glob(".*.tmp-*"))  # stale temporaries are removed on resume
    # resuming on another number of ranks works (equal up to round-off amplified by phasing)
    r3, _ = _mpirun(1, data, other, extra=["--resume"])
    assert r3.returncode == 0, r3.stderr[-2000:]
    a, b = _result(tmp_path / "full"), _result(other)
    assert np.corrcoef(a["density"].ravel(), b["density"].ravel())[0, 1] > 0.8
    # a finished run has nothing left to resume: one clear line, exit 2
    r4, _ = _mpirun(1, data, cut, extra=["--resume"])
    assert r4.returncode == 2 and "nothing to do" in r4.stderr


def test_same_seed_same_ranks_is_bitwise_identical(data, tmp_path):
    ctx = ParallelContext.serial()
    run_pipeline(_cfg(data, tmp_path / "a"), ctx)
    run_pipeline(_cfg(data, tmp_path / "b"), ctx)
    a, b = _result(tmp_path / "a"), _result(tmp_path / "b")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_resume_continues_the_half_set_chains(data, tmp_path, monkeypatch):
    """With independent half sets the checkpoint carries both half chains: a run cut after
    generation 1 and resumed ends where the uninterrupted run ends (half maps included)."""
    ctx = ParallelContext.serial()

    def cfg(out):
        c = load_config(None, (), {"algorithm": dict(ALGO, match_resolution_ramp=2),
                                   "data": {"path": str(data)}, "output": {"dir": str(out)},
                                   "validation": {"half_sets": "independent"}})
        return c

    run_pipeline(cfg(tmp_path / "full"), ctx)
    out = tmp_path / "cut"
    monkeypatch.setenv(FAULT_VARIABLE, "1")
    with pytest.raises(InjectedFault):
        run_pipeline(cfg(out), ctx)
    monkeypatch.delenv(FAULT_VARIABLE)
    run_pipeline(cfg(out), ctx, resume=True)
    _assert_same(_result(tmp_path / "full"), _result(out))
    with h5py.File(tmp_path / "full" / "checkpoint.h5") as f0, h5py.File(out / "checkpoint.h5") as f1:
        for k in ("half_merged_ac", "half_density"):
            assert np.array_equal(f0[k][()], f1[k][()]), k
    m = json.loads((out / "metrics.json").read_text())
    assert [g["half_set"]["mode"] for g in m["generations"]] == ["shared", "shared",
                                                                  "independent", "independent"]


def test_checkpoint_of_another_file_of_the_same_shape_is_refused(data, tmp_path):
    """Resume must refuse a checkpoint written for another dataset of the same shape.

    The old fingerprint held only the shape and the config, so ``--resume`` on another
    file with as many images and pixels was accepted. Identity: path, size and a digest of
    the first, middle and last image.
    """
    from spinifel.io import checkpoint

    cfg = _cfg(data, tmp_path / "o")
    n = 80
    ident = checkpoint.dataset_identity(data, n)
    assert ident == checkpoint.dataset_identity(data, n)  # stable for one file
    other = tmp_path / "other.h5"
    shutil.copy(data, other)
    with h5py.File(other, "r+") as f:
        f["intensities"][n // 2] = f["intensities"][n // 2] + 1  # same shape, one image differs
    moved = tmp_path / "moved.h5"
    shutil.copy(data, moved)
    ids = {checkpoint.dataset_identity(p, n) for p in (data, other, moved)}
    assert len(ids) == 3
    fp = checkpoint.fingerprint(cfg, n, (1, 12, 12), ident)
    (tmp_path / "ck").mkdir()
    checkpoint.write_checkpoint(tmp_path / "ck", generation=0, fingerprint=fp, config_toml="",
                                density=np.zeros((3, 3, 3)))
    assert checkpoint.read_checkpoint(tmp_path / "ck", fp)["generation"] == 0
    fp_other = checkpoint.fingerprint(cfg, n, (1, 12, 12),
                                      checkpoint.dataset_identity(other, n))
    assert fp_other != fp
    with pytest.raises(CheckpointError, match="another dataset"):
        checkpoint.read_checkpoint(tmp_path / "ck", fp_other)
