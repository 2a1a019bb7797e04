"""A numpy-backed stand-in for CuPy (and cufinufft), to run the GPU-only branches without a GPU.

What it checks that plain numpy runs cannot:

* the code takes the ``xp is not numpy`` branches (cufinufft plans, the fused matching
  kernel's caller, device staging of collectives, memory-pool release);
* like CuPy, it refuses to mix host arrays into device arithmetic (a ufunc with a numpy
  array operand raises TypeError), so a forgotten host->device move fails;
* every device->host copy goes through ``.get()``, which is counted (``TRANSFERS``), so the
  number of synchronisations of a loop can be asserted.

What it cannot check: CUDA itself (kernels, cuFFT, cufinufft numerics), and CuPy's refusal
of ``numpy.asarray(device_array)`` (numpy sees the stand-in as an ndarray subclass).
Install with :func:`install` (monkeypatch ``sys.modules``); the fused kernel is replaced by
its numpy reference.
"""

from __future__ import annotations

import importlib.machinery
import types

import numpy as np

TRANSFERS: list[int] = []  # nbytes of every device -> host copy
CALLS: list[str] = []  # "plan1"/"plan2" per cufinufft plan, "fused" per kernel launch


class ndarray(np.ndarray):
    def get(self):
        TRANSFERS.append(self.nbytes)
        return np.array(self.view(np.ndarray), copy=True)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        for x in inputs:
            if type(x) is np.ndarray and x.ndim > 0:
                raise TypeError(f"fake cupy: host array operand in {ufunc.__name__} "
                                "(CuPy refuses implicit host/device mixing)")
        args = [x.view(np.ndarray) if isinstance(x, ndarray) else x for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, ndarray) else o for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _dev(result)


ndarray.__module__ = "cupy"


def _dev(r):
    if isinstance(r, ndarray):
        return r
    if isinstance(r, np.ndarray):
        return r.view(ndarray)
    if isinstance(r, np.generic):  # CuPy reductions return 0-d device arrays
        return np.asarray(r).view(ndarray)
    if isinstance(r, tuple):
        return tuple(_dev(x) for x in r)
    if isinstance(r, list):
        return [_dev(x) for x in r]
    return r


def _wrap(fn, allow_host=False):
    def call(*args, **kwargs):
        if not allow_host:
            for x in list(args) + list(kwargs.values()):
                if type(x) is np.ndarray and x.ndim > 0:
                    raise TypeError(f"fake cupy: host array passed to {fn.__name__}")
        return _dev(fn(*args, **kwargs))

    call.__name__ = getattr(fn, "__name__", "fn")
    return call


class _Namespace(types.ModuleType):
    def __init__(self, name, base):
        super().__init__(name)
        self._base = base

    def __getattr__(self, name):
        obj = getattr(self._base, name)
        if callable(obj) and not isinstance(obj, type):
            return _wrap(obj)
        return obj


class _Pool:
    def __init__(self):
        self.released = 0

    def free_all_blocks(self):
        self.released += 1

    def free_bytes(self):
        return 0


class _Device:
    current = 0
    used: list[int] = []

    def __init__(self, i=None):
        self.id = _Device.current if i is None else i

    def use(self):
        _Device.current = self.id
        _Device.used.append(self.id)

    @property
    def mem_info(self):
        return (8 * 2**30, 16 * 2**30)


class _Stream:
    def synchronize(self):
        return None


def make_module() -> types.ModuleType:
    m = _Namespace("cupy", np)
    m.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    m.ndarray = ndarray
    m.asarray = _wrap(np.asarray, allow_host=True)  # the explicit host -> device copy
    m.array = _wrap(np.array, allow_host=True)
    m.asnumpy = lambda x: x.get() if isinstance(x, ndarray) else np.asarray(x)
    m.fft = _Namespace("cupy.fft", np.fft)
    m.linalg = _Namespace("cupy.linalg", np.linalg)
    m.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        Device=_Device, get_current_stream=lambda: _Stream())
    pool, pinned = _Pool(), _Pool()
    m.get_default_memory_pool = lambda: pool
    m.get_default_pinned_memory_pool = lambda: pinned
    m.pool = pool
    return m


class _CuPlan:
    """cufinufft.Plan on top of finufft.Plan: device (stand-in) arrays in and out."""

    def __init__(self, nufft_type, n_modes, n_trans=1, eps=1e-6, isign=None,
                 dtype="complex64", **opts):
        import finufft

        assert "gpu_device_id" in opts, "the device must be passed to cufinufft"
        opts.pop("gpu_device_id")
        CALLS.append(f"plan{nufft_type}")
        self._plan = finufft.Plan(nufft_type, n_modes, n_trans=n_trans, eps=eps, isign=isign,
                                  dtype=dtype, **opts)

    def setpts(self, x, y=None, z=None):
        for a in (x, y, z):
            if not isinstance(a, ndarray):
                raise TypeError("cufinufft needs device arrays for the points")
        self._pts = tuple(a.view(np.ndarray) for a in (x, y, z))
        self._plan.setpts(*self._pts)

    def execute(self, data, out=None):
        if not isinstance(data, ndarray):
            raise TypeError("cufinufft needs a device array")
        return self._plan.execute(data.view(np.ndarray)).view(ndarray)


class _CsrMatrix:
    """``cupyx.scipy.sparse.csr_matrix`` from device (data, indices, indptr), ``@`` a device array."""

    def __init__(self, arg, shape):
        import scipy.sparse

        for a in arg:
            if not isinstance(a, ndarray):
                raise TypeError("cupyx.scipy.sparse.csr_matrix needs device arrays")
        self._m = scipy.sparse.csr_matrix(tuple(a.view(np.ndarray) for a in arg), shape=shape)
        self.shape = self._m.shape

    def __matmul__(self, other):
        if not isinstance(other, ndarray):
            raise TypeError("fake cupyx: host operand of a device sparse product")
        return np.asarray(self._m @ other.view(np.ndarray)).view(ndarray)


def _cupyx_modules() -> dict[str, types.ModuleType]:
    mods = {n: types.ModuleType(n) for n in ("cupyx", "cupyx.scipy", "cupyx.scipy.sparse")}
    for n, m in mods.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
    mods["cupyx"].scipy = mods["cupyx.scipy"]
    mods["cupyx.scipy"].sparse = mods["cupyx.scipy.sparse"]
    mods["cupyx.scipy.sparse"].csr_matrix = _CsrMatrix
    return mods


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-ins in ``sys.modules`` and the fused kernel's reference in its place."""
    import sys

    from spinifel.backend import kernels

    cp = make_module()
    cuf = types.ModuleType("cufinufft")
    cuf.__spec__ = importlib.machinery.ModuleSpec("cufinufft", None)
    cuf.Plan = _CuPlan
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cufinufft", cuf)
    for name, mod in _cupyx_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)

    def fused(images, slices, weights, scale_per_image=False, slice_offset=0, block=256):
        for a in (images, slices, weights):
            assert isinstance(a, ndarray) and a.dtype == np.float32
        CALLS.append("fused")
        host = [a.view(np.ndarray) for a in (images, slices, weights)]  # "on the device"
        d, i = kernels.match_fused_reference(*host, scale_per_image, slice_offset)
        # the kernel accumulates in float32
        return np.asarray(d, np.float32).astype(np.float64).view(ndarray), i.view(ndarray)

    monkeypatch.setattr(kernels, "match_fused_gpu", fused)
    TRANSFERS.clear()
    CALLS.clear()
    return cp
