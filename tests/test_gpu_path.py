"""The GPU path without a GPU: backend selection, rank -> device binding, batch sizes from
device memory, host-staged collectives (with stand-ins for CuPy and MPI), no CuPy import on
the CPU path; and, marked ``gpu`` (skipped without CuPy and a device), numpy vs cupy parity.
"""

import importlib.machinery
import importlib.util
import subprocess
import sys
import textwrap
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest

from spinifel.backend import select
from spinifel.backend.select import (
    IMAGE_BYTES_PER_PIXEL,
    ORIENTATION_ITEMS_PER_PIXEL,
    Backends,
    batch_caps,
    bind_device,
    device_for_rank,
    release_memory_pool,
    select_backends,
)
from spinifel.errors import ConfigError
from spinifel.parallel.collectives import allreduce_sum, bcast_array
from spinifel.parallel.context import ParallelContext, SerialComm

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Stand-ins: a CuPy module with a chosen number of devices, a fake device array type
# ---------------------------------------------------------------------------------------


class FakeDeviceArray(np.ndarray):
    """A numpy array that the array helpers take for a CuPy array (its type's module)."""

    def get(self):
        return np.array(self).view(np.ndarray)


FakeDeviceArray.__module__ = "cupy._fake"


def _fake_cupy(n_devices=0, error=None):
    m = types.ModuleType("cupy")
    m.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    used, synced = [], []

    def count():
        if error is not None:
            raise error
        return n_devices

    class Device:
        def __init__(self, i=0):
            self.id = i

        def use(self):
            used.append(self.id)

    class Stream:
        def synchronize(self):
            synced.append(True)

    m.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count),
                                   Device=Device, get_current_stream=lambda: Stream())
    m.asarray = lambda x, dtype=None: np.asarray(x, dtype=dtype).view(FakeDeviceArray)
    m.ascontiguousarray = lambda x, dtype=None: np.ascontiguousarray(x, dtype=dtype).view(
        FakeDeviceArray)
    m.empty = lambda shape, dtype=float: np.empty(shape, dtype).view(FakeDeviceArray)
    m.used, m.synced = used, synced
    return m


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError


# ---------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------


def test_numpy_backend_is_numpy_with_finufft():
    be = select_backends("numpy", ("cufinufft", "finufft"))
    assert (be.array, be.xp, be.nufft, be.gpu) == ("numpy", np, "finufft", False)
    assert "numpy" in be.skipped["cufinufft"]


def test_mixed_gpu_warning_names_the_ranks_without_gpu():
    """auto with some ranks lacking a GPU: one warning naming exactly those ranks.

    The pipeline logged this at INFO only, so a GPU job silently ran on the CPU.
    """
    assert select.mixed_gpu_warning([True] * 4) is None
    assert select.mixed_gpu_warning([False] * 4) is None  # a CPU machine: nothing mixed
    gpu = [True, False, False, False, True, False, True, True, False]
    msg = select.mixed_gpu_warning(gpu, ["ok"] + ["CuPy is not installed"] * 8)
    assert "5 of 9 ranks" in msg and "(ranks 1-3, 5, 8)" in msg
    assert "rank 1: CuPy is not installed" in msg and "numpy" in msg
    assert "\n" not in msg


def test_auto_without_cupy_falls_back_to_numpy_with_reason(no_cupy):
    be = select_backends("auto", ("cufinufft", "finufft"))
    assert be.array == "numpy" and be.nufft == "finufft"
    assert "CuPy is not installed" in be.reason


def test_explicit_cupy_without_cupy_is_a_config_error(no_cupy):
    with pytest.raises(ConfigError, match=r"runtime\.backend.*CuPy is not installed"):
        select_backends("cupy", ("cufinufft", "finufft"))


@pytest.mark.parametrize("n, error, why", [(0, None, "no CUDA device"),
                                           (0, RuntimeError("cudaErrorNoDevice"), "cudaErrorNoDevice")])
def test_auto_with_cupy_but_no_device_is_numpy(monkeypatch, n, error, why):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(n, error))
    be = select_backends("auto", ("cufinufft", "finufft"))
    assert be.array == "numpy" and why in be.reason
    with pytest.raises(ConfigError, match=r"runtime\.backend"):
        select_backends("cupy", ("cufinufft", "finufft"))


def test_gpu_without_cufinufft(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(2))
    monkeypatch.setitem(sys.modules, "cufinufft", None)
    be = select_backends("auto", ("cufinufft", "finufft"))
    assert be.array == "numpy" and "cufinufft" in be.reason and "2 CUDA devices" in be.reason
    with pytest.raises(ConfigError, match=r"runtime\.nufft_backends.*cufinufft"):
        select_backends("cupy", ("cufinufft", "finufft"))


def test_gpu_with_cufinufft_selects_cupy(monkeypatch):
    fake = _fake_cupy(2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cufinufft", types.ModuleType("cufinufft"))
    for requested in ("auto", "cupy"):
        be = select_backends(requested, ("finufft", "cufinufft"))
        assert (be.array, be.xp, be.nufft, be.gpu) == ("cupy", fake, "cufinufft", True)
        assert "array backend is cupy" in be.skipped["finufft"]


def test_nufft_order_without_a_fitting_library_is_a_config_error():
    with pytest.raises(ConfigError, match=r"runtime\.nufft_backends"):
        select_backends("numpy", ("cufinufft",))


# ---------------------------------------------------------------------------------------
# Rank -> GPU binding
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_rank, n_devices, expected", [
    (0, 4, 0), (3, 4, 3), (5, 4, 1), (7, 4, 3),  # 8 ranks on 4 GPUs: two per GPU
    (0, 6, 0), (5, 6, 5),                          # one rank per GPU (6 per node)
    (2, 1, 0),                                     # jsrun -g1: every rank sees one device
])
def test_device_for_rank(node_rank, n_devices, expected):
    assert device_for_rank(node_rank, n_devices) == expected


def test_device_for_rank_rejects_no_devices():
    with pytest.raises(ValueError, match="n_devices"):
        device_for_rank(0, 0)


class _NodeComm(SerialComm):
    def __init__(self, rank, size):
        self._r, self._s = rank, size

    def Get_rank(self):
        return self._r

    def Get_size(self):
        return self._s


def test_bind_device_uses_the_node_local_rank(monkeypatch):
    fake = _fake_cupy(4)
    ctx = ParallelContext(comm=SerialComm(), node_comm=_NodeComm(5, 8))
    be = bind_device(Backends("cupy", fake, "cufinufft", "test"), ctx.node_rank, ctx.node_size)
    assert be.device == 1 and fake.used == [1]
    cpu = Backends("numpy", np, "finufft", "test")
    assert bind_device(cpu, 5, 8) is cpu


# ---------------------------------------------------------------------------------------
# Batch sizes from free device memory
# ---------------------------------------------------------------------------------------


def test_batch_caps_numbers():
    # 16 GiB free, half of it per stage, 10 000 pixels
    # per orientation 7 float32 + 8 index bytes per pixel, per image 80 bytes per pixel
    ob, ib = batch_caps(16 * 2**30, 10_000, "single")
    assert ob == 8 * 2**30 // (10_000 * 36) == 23860
    assert ib == 8 * 2**30 // (10_000 * 80) == 10737
    ob2, ib2 = batch_caps(16 * 2**30, 10_000, "double")
    assert ob2 == 8 * 2**30 // (10_000 * 64) == 13421 and ib2 == ib
    # the caps are the largest batches whose modelled memory fits the share
    assert ob * 10_000 * 36 <= 8 * 2**30 < (ob + 1) * 10_000 * 36
    assert batch_caps(16 * 2**30, 10_000, "single", fraction=0.25) == (ob // 2, ib // 2)
    assert batch_caps(1000, 10_000, "single") == (1, 1)  # never 0
    with pytest.raises(ValueError, match="precision"):
        batch_caps(2**30, 100, "half")


def _peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_orientation_batch_memory_model_bounds_the_measured_peak(rng):
    """The per-orientation bytes of batch_caps cover what slicing + transform allocate
    (measured with tracemalloc on the numpy path, which allocates the same arrays)."""
    from spinifel.orientation.matching import apply_transform
    from spinifel.orientation.slicing import Slicer

    M, B, P = 9, 200, 600
    pos = rng.uniform(-1, 1, (3, P))
    slicer = Slicer(rng.random((M, M, M)), pos, 2.0, 1e-4, np.float32)
    q = rng.normal(size=(B, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    apply_transform(slicer.slices(q), "sqrt")  # warm up (plan buffers)
    peak = _peak(lambda: apply_transform(slicer.slices(q), "sqrt"))
    model = ORIENTATION_ITEMS_PER_PIXEL * 4 * B * P  # the host part (no cufinufft indices)
    assert 0.5 * model <= peak <= model, (peak, model)


def test_image_batch_memory_model_bounds_the_measured_peak(rng):
    from spinifel.merging.merge import accumulate_normal_equations

    M, n, P = 5, 150, 800
    pos = rng.uniform(-1, 1, (3, P))
    images = rng.random((n, P)).astype(np.float32)
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    def run():
        accumulate_normal_equations(SerialComm(), images, q, pos, 2.0, M, image_batch=n)

    run()
    peak = _peak(run)
    grids = (M**3 + (2 * M) ** 3) * 16 * 3  # rhs, kernel and their FFT spectrum, small
    model = IMAGE_BYTES_PER_PIXEL * n * P
    assert 0.5 * model <= peak <= model + grids, (peak, model)


def test_release_memory_pool_is_a_no_op_on_numpy():
    assert release_memory_pool(np) is None
    assert select.free_device_bytes(np) is None


# ---------------------------------------------------------------------------------------
# Host-staged collectives
# ---------------------------------------------------------------------------------------


class _TwoRanks(SerialComm):
    """Rank 0 of a pretend 2-rank job: Allreduce doubles, Bcast keeps root's data."""

    def __init__(self):
        self.buffers = []

    def Get_size(self):
        return 2

    def bcast(self, obj, root=0):
        return obj

    def Allreduce(self, sendbuf, recvbuf, op=None):
        self.buffers.append(recvbuf)
        recvbuf *= 2

    def Bcast(self, buf, root=0):
        self.buffers.append(buf)


def test_allreduce_of_a_device_array_is_staged_through_the_host(monkeypatch):
    fake = _fake_cupy(1)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    comm = _TwoRanks()
    dev = np.arange(6.0).reshape(2, 3).view(FakeDeviceArray)
    out = allreduce_sum(comm, dev)
    assert out is dev and np.array_equal(np.asarray(dev), 2 * np.arange(6.0).reshape(2, 3))
    assert type(comm.buffers[0]) is np.ndarray  # MPI saw a host buffer
    assert fake.synced == []


def test_allreduce_cuda_aware_passes_the_device_buffer(monkeypatch):
    fake = _fake_cupy(1)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    comm = _TwoRanks()
    dev = np.ones(4).view(FakeDeviceArray)
    allreduce_sum(comm, dev, cuda_aware=True)
    assert comm.buffers[0] is dev and fake.synced == [True]
    assert np.array_equal(np.asarray(dev), np.full(4, 2.0))


def test_allreduce_host_array_and_serial_comm():
    a = np.arange(3.0)
    assert allreduce_sum(SerialComm(), a) is a and np.array_equal(a, np.arange(3.0))
    comm = _TwoRanks()
    allreduce_sum(comm, a)
    assert comm.buffers[0] is a and np.array_equal(a, 2 * np.arange(3.0))


@pytest.mark.parametrize("cuda_aware", [False, True])
def test_bcast_of_a_device_array(monkeypatch, cuda_aware):
    fake = _fake_cupy(1)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    comm = _TwoRanks()
    dev = np.arange(5.0).view(FakeDeviceArray)
    out = bcast_array(comm, dev, cuda_aware=cuda_aware)
    assert isinstance(out, FakeDeviceArray) and np.array_equal(np.asarray(out), np.arange(5.0))
    assert (type(comm.buffers[0]) is np.ndarray) == (not cuda_aware)


# ---------------------------------------------------------------------------------------
# The CPU path never imports CuPy or cufinufft
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_cpu_pipeline_does_not_import_gpu_packages(tmp_path, backend):
    if backend == "auto" and importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: 'auto' imports it to count the devices")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from helpers import write_dataset
        from spinifel.config import load_config
        from spinifel.parallel.context import ParallelContext
        from spinifel.pipeline import run_pipeline
        write_dataset({str(tmp_path / 'd.h5')!r}, n_images=12, H=12, W=12)
        cfg = load_config(None, (), {{
            "data": {{"path": {str(tmp_path / 'd.h5')!r}}},
            "output": {{"dir": {str(tmp_path / 'out')!r}}},
            "runtime": {{"backend": {backend!r}}},
            "algorithm": {{"M": 9, "generations": 2, "n_orientations": 40, "n_phase_loops": 1,
                          "n_er": 2, "n_hio": 2, "n_final_er": 2, "lambdas": [0.1],
                          "cg_max_iter": 5, "refine_generations": 0}}}})
        run_pipeline(cfg, ParallelContext.serial())
        print("GPU MODULES:", sorted(m for m in sys.modules
                                     if m.split(".")[0] in ("cupy", "cufinufft", "cupyx")))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GPU MODULES: []" in r.stdout, r.stdout


# ---------------------------------------------------------------------------------------
# On a GPU: cupy results against numpy
# ---------------------------------------------------------------------------------------


def _gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def _cufinufft():
    try:
        import cufinufft  # noqa: F401 - availability probe

        return True
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(_gpu() is None, reason="no CUDA GPU with CuPy")
needs_cufinufft = pytest.mark.skipif(_gpu() is None or not _cufinufft(),
                                     reason="no CUDA GPU with CuPy and cufinufft")


@pytest.mark.gpu
@needs_cufinufft
@pytest.mark.parametrize("dtype, eps", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_cufinufft_matches_finufft(rng, dtype, eps):
    from spinifel.backend.nufft import Type1, Type2

    cp = _gpu()
    n = (9, 11, 7)
    pts = rng.uniform(-np.pi, np.pi, (3, 500))
    modes = rng.normal(size=n) + 1j * rng.normal(size=n)
    vals = rng.normal(size=500) + 1j * rng.normal(size=500)
    for cls, data in ((Type2, modes), (Type1, vals)):
        ref_plan, dev_plan = cls(n, eps, dtype), cls(n, eps, dtype, xp=cp)
        ref_plan.setpts(pts)
        dev_plan.setpts(cp.asarray(pts))
        ref = ref_plan.execute(data)
        out = dev_plan.execute(cp.asarray(data))
        assert isinstance(out, cp.ndarray) and out.shape == ref.shape
        # both are within eps (relative, l2) of the exact sums
        assert np.linalg.norm(out.get() - ref) <= 10 * max(eps, 2e-6) * np.linalg.norm(ref)
        # the plan is reused with new points
        dev_plan.setpts(cp.asarray(pts[:, ::-1].copy()))
        ref_plan.setpts(pts[:, ::-1].copy())
        assert np.linalg.norm(dev_plan.execute(cp.asarray(data)).get() - ref_plan.execute(data)) \
            <= 10 * max(eps, 2e-6) * np.linalg.norm(ref)


@pytest.mark.gpu
@needs_gpu
def test_cg_and_toeplitz_operator_on_device_match_host(rng):
    from spinifel.merging.cg import conjugate_gradient
    from spinifel.merging.operator import ToeplitzNormalOperator, kernel_spectrum

    cp = _gpu()
    M = 7
    kern = rng.normal(size=(2 * M,) * 3)
    kern = kern + np.flip(np.roll(np.flip(kern), 1, axis=(0, 1, 2)))  # even: real spectrum
    spec = kernel_spectrum(kern)
    spec = np.abs(spec) + 1.0  # make the operator SPD
    b = rng.normal(size=(M, M, M))
    host = conjugate_gradient(ToeplitzNormalOperator(spec), b, max_iter=50, tol=1e-10)
    dev = conjugate_gradient(ToeplitzNormalOperator(cp.asarray(spec)), cp.asarray(b),
                             max_iter=50, tol=1e-10)
    assert isinstance(dev.x, cp.ndarray)
    assert np.allclose(dev.x.get(), host.x, rtol=1e-8, atol=1e-10 * np.abs(host.x).max())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("scale", [False, True])
def test_matching_on_device_uses_the_fused_kernel_and_agrees(rng, scale):
    from spinifel.orientation.matching import match_orientations

    cp = _gpu()
    images = rng.uniform(0, 3, (40, 200)).astype(np.float32)
    batches = [(o, rng.uniform(0, 3, (100, 200)).astype(np.float32)) for o in (0, 100, 200)]
    ref = match_orientations(images, batches, scale, image_batch=16, transform="sqrt")
    dev = match_orientations(cp.asarray(images), [(o, cp.asarray(s)) for o, s in batches], scale,
                             image_batch=16, transform="sqrt").to(np)
    # float32 distances: the index may differ only where two slices are within round-off
    same = dev.best_index == ref.best_index
    assert same.mean() >= 0.95
    assert np.allclose(dev.best_dist, ref.best_dist, rtol=1e-4, atol=1e-3)
    assert np.allclose(dev.best_scale[same], ref.best_scale[same], rtol=1e-4)


@pytest.mark.gpu
@needs_cufinufft
def test_pipeline_numpy_vs_cupy(tmp_path):
    import h5py

    from spinifel.config import load_config
    from spinifel.pipeline import run_pipeline
    from spinifel.simulate.dataset import simulate_dataset
    from spinifel.simulate.structure import builtin_molecule

    path = tmp_path / "tiny.h5"
    simulate_dataset(path, builtin_molecule(seed=0, n_atoms=300), n_images=200, n_pixels=16,
                     pixel_size_m=6e-3, M=25, seed=0, beamstop_radius_px=1.0)
    results = {}
    for backend in ("numpy", "cupy"):
        cfg = load_config(None, (), {
            "data": {"path": str(path)}, "output": {"dir": str(tmp_path / backend)},
            "runtime": {"backend": backend, "precision": "double"},
            "algorithm": {"M": 25, "generations": 1, "n_orientations": 300, "n_phase_loops": 2,
                          "n_er": 10, "n_hio": 10, "n_final_er": 10, "lambdas": [1e-2, 1e-1, 1.0],
                          "cg_max_iter": 30, "use_true_orientations": True}})
        run_pipeline(cfg, ParallelContext.serial())
        with h5py.File(tmp_path / backend / "result.h5") as f:
            results[backend] = f["autocorrelation"][()].astype(np.float64)
    # with the true orientations the merge is deterministic: the NUFFT tolerance bounds it
    ref, dev = results["numpy"], results["cupy"]
    assert np.linalg.norm(dev - ref) <= 1e-4 * np.linalg.norm(ref)


# ---------------------------------------------------------------------------------------
# The GPU-only branches with a numpy-backed CuPy stand-in (tests/fake_cupy.py)
# ---------------------------------------------------------------------------------------


def test_cg_synchronises_once_per_iteration(monkeypatch, rng):
    import fake_cupy
    from spinifel.merging.cg import conjugate_gradient
    from spinifel.merging.operator import ToeplitzNormalOperator

    cp = fake_cupy.install(monkeypatch)
    M = 7
    spec = 1.0 + rng.random((2 * M, 2 * M, M + 1))
    b = rng.normal(size=(M, M, M))
    host = conjugate_gradient(ToeplitzNormalOperator(spec), b, max_iter=20, tol=1e-12)
    fake_cupy.TRANSFERS.clear()
    dev = conjugate_gradient(ToeplitzNormalOperator(cp.asarray(spec)), cp.asarray(b),
                             max_iter=20, tol=1e-12)
    assert isinstance(dev.x, cp.ndarray) and dev.n_iter == host.n_iter >= 5
    # 2 x 8-byte scalars per iteration: (p.Ap, r.r); the two norms before the loop are float()s
    assert fake_cupy.TRANSFERS == [16] * dev.n_iter
    assert np.allclose(dev.x.get(), host.x, rtol=1e-12, atol=1e-12)


def test_phasing_transfers_do_not_grow_with_iterations(monkeypatch, rng):
    import fake_cupy
    from spinifel.phasing.algorithms import autocorrelation_from_density
    from spinifel.phasing.phase import phase

    cp = fake_cupy.install(monkeypatch)
    rho = np.zeros((15, 15, 15))
    rho[5:10, 6:9, 5:11] = rng.random((5, 3, 6))
    ac = cp.asarray(autocorrelation_from_density(rho))
    counts = []
    for loops in (1, 4):
        fake_cupy.TRANSFERS.clear()
        res = phase(ac, n_loops=loops, n_er=5, n_hio=5, beta=0.9, sw_sigma=1.0, sw_threshold=0.1,
                    n_final_er=5, rng=np.random.default_rng(0))
        assert isinstance(res.density, cp.ndarray)
        counts.append(len(fake_cupy.TRANSFERS))
    assert counts[0] == counts[1] <= 6, counts


@pytest.mark.parametrize("mode, scale, validation", [
    ("replicated", True, {}), ("distributed", False, {}),
    ("replicated", True, {"half_sets": "shared", "prtf_runs": 2})])
def test_pipeline_gpu_branches_match_numpy(monkeypatch, tmp_path, mode, scale, validation):
    """The whole pipeline with runtime.backend = cupy on the stand-in: the GPU branches run
    (cufinufft plans on device arrays, fused-kernel matching, staged collectives, pool
    release) and give the numpy result up to round-off."""
    import h5py

    import fake_cupy
    from helpers import write_dataset
    from spinifel.config import load_config
    from spinifel.pipeline import run_pipeline

    write_dataset(tmp_path / "d.h5", n_images=16, H=12, W=12)
    results = {}
    for backend in ("numpy", "cupy"):
        if backend == "cupy":
            cp = fake_cupy.install(monkeypatch)
        cfg = load_config(None, (), {
            "data": {"path": str(tmp_path / "d.h5")}, "output": {"dir": str(tmp_path / backend)},
            "runtime": {"backend": backend, "precision": "double"},
            "algorithm": {"M": 9, "generations": 3, "n_orientations": 60, "n_phase_loops": 1,
                          "n_er": 3, "n_hio": 3, "n_final_er": 3, "lambdas": [0.01, 0.1, 1.0],
                          "cg_max_iter": 10, "refine_generations": 1, "scale_per_image": scale,
                          "matching_mode": mode,
                          # the lattice stencil: the parabolic one moves continuously with
                          # the stand-in cufinufft's NUFFT-tolerance differences
                          "refine_stencil": "cube"}, "validation": validation})
        run_pipeline(cfg, ParallelContext.serial())
        with h5py.File(tmp_path / backend / "result.h5") as f:
            results[backend] = {k: f[k][()] for k in ("autocorrelation", "orientations", "density")}
        if validation:  # the half maps' merges ran through the device path too
            with h5py.File(tmp_path / backend / "checkpoint.h5") as f:
                results[backend]["half_merged_ac"] = f["half_merged_ac"][()]
    assert cp.pool.released >= 2  # after matching and after the merge
    # generations 1 and 2 matched 16 images against 60 orientations with the kernel
    assert fake_cupy.CALLS.count("fused") >= 2
    assert {"plan1", "plan2"} <= set(fake_cupy.CALLS)
    ref, dev = results["numpy"], results["cupy"]
    assert np.allclose(dev["orientations"], ref["orientations"], atol=1e-6)
    assert np.allclose(dev["autocorrelation"], ref["autocorrelation"], rtol=1e-5,
                       atol=1e-5 * np.abs(ref["autocorrelation"]).max())
    if validation:
        assert np.allclose(dev["half_merged_ac"], ref["half_merged_ac"], rtol=1e-5,
                           atol=1e-5 * np.abs(ref["half_merged_ac"]).max())


@pytest.mark.mpi(min_size=2)
def test_gpu_branches_on_two_ranks_match_numpy(monkeypatch):
    """Ring matching and the merge with device (stand-in) arrays over real MPI: the staged
    sendrecv/Allreduce/Bcast give the serial numpy result."""
    from mpi4py import MPI

    import fake_cupy
    from spinifel.geometry.orientations import orientation_grid
    from spinifel.merging.merge import accumulate_normal_equations, merge
    from spinifel.orientation.matching import match_distributed, match_orientations
    from spinifel.orientation.slicing import Slicer
    from spinifel.parallel.partition import block_range
    from spinifel.phasing.algorithms import autocorrelation_from_density

    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(9)
    M = 9
    x = rng.uniform(0, 1, (M, M, M))
    ac = autocorrelation_from_density(x)
    s = rng.uniform(-1, 1, (3, 60)) * 1e9
    extent = np.linalg.norm(s, axis=0).max()
    grid = orientation_grid(150)
    images = np.abs(rng.standard_normal((21, 60))).astype(np.float32) * 1e3
    q = grid[rng.choice(150, 21)]
    a, b = block_range(len(images), comm.Get_size(), comm.Get_rank())
    ref = match_orientations(images, Slicer(ac, s, extent, 1e-6).iter_batches(grid, 50), True,
                             4096, "sqrt")
    eq_ref = accumulate_normal_equations(SerialComm(), images, q, s, extent, M, eps=1e-9)
    kw = dict(lambdas_rel=[1e-3, 1e-2, 1e-1], x0=np.zeros((M, M, M)), x_init=np.zeros((M, M, M)),
              support=None, max_iter=15, tol=1e-10)
    res_ref = merge(SerialComm(), eq_ref, **kw)

    cp = fake_cupy.install(monkeypatch)
    slicer = Slicer(ac, cp.asarray(s), extent, 1e-6)
    got = match_distributed(comm, cp.asarray(images[a:b]), slicer, grid, 50, True, 4096, "sqrt")
    assert isinstance(got.best_index, cp.ndarray)
    got = got.to(np)
    assert np.array_equal(got.best_index, ref.best_index[a:b])
    assert np.allclose(got.best_dist, ref.best_dist[a:b], rtol=1e-5)
    eq = accumulate_normal_equations(comm, cp.asarray(images[a:b]), q[a:b], cp.asarray(s), extent,
                                     M, eps=1e-9)
    assert isinstance(eq.rhs, cp.ndarray) and isinstance(eq.spectrum, cp.ndarray)
    assert np.allclose(eq.rhs.get(), eq_ref.rhs, rtol=1e-9, atol=1e-9 * np.abs(eq_ref.rhs).max())
    res = merge(comm, eq, **kw)
    assert isinstance(res.autocorrelation, cp.ndarray) and res.index == res_ref.index
    assert np.allclose(res.autocorrelation.get(), res_ref.autocorrelation, rtol=1e-8,
                       atol=1e-8 * np.abs(res_ref.autocorrelation).max())


def test_cpu_install_has_no_gpu_packages():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = " ".join(project["dependencies"]).lower()
    assert "cupy" not in names and "cufinufft" not in names
    gpu = " ".join(project["optional-dependencies"]["gpu"]).lower()
    assert "cupy-cuda12x" in gpu and "cufinufft" in gpu
