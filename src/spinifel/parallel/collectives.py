"""The few collectives the pipeline needs (works with SerialComm too).

Buffers may be numpy or cupy arrays. Device buffers are staged through host memory by
default (any MPI works); with ``cuda_aware=True`` they are handed to MPI directly, which
needs an MPI library built with CUDA support (mpi4py passes ``__cuda_array_interface__``
buffers through; the current stream is synchronised first so the data is complete).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import numpy as np

from spinifel.backend.arrays import _is_cupy_array, get_array_module, to_host, to_module
from spinifel.parallel.context import SerialComm, in_place


def _sync(array: Any) -> None:
    """Wait for the kernels writing a device buffer before MPI reads it."""
    if _is_cupy_array(array):
        get_array_module(array).cuda.get_current_stream().synchronize()


def allreduce_sum(comm: Any, array: Any, cuda_aware: bool = False) -> Any:
    """Sum a contiguous array over all ranks, in place; returns it.

    Parameters
    ----------
    comm : communicator
        Collective over its ranks.
    array : numpy or cupy array, C-contiguous
        Summed in place (a device array stays on the device).
    cuda_aware : bool
        Device arrays only: pass the device buffer to MPI (True) or copy it to the host,
        reduce there and copy the sum back (False).
    """
    if not array.flags.c_contiguous:
        raise ValueError("allreduce_sum needs a C-contiguous array")
    if comm.Get_size() == 1:
        return array
    op = None
    if not isinstance(comm, SerialComm):
        from mpi4py import MPI

        op = MPI.SUM
    if _is_cupy_array(array) and not cuda_aware:
        host = np.ascontiguousarray(to_host(array))
        comm.Allreduce(in_place(comm), host, op=op)
        array[...] = to_module(host, get_array_module(array))
        return array
    _sync(array)
    comm.Allreduce(in_place(comm), array, op=op)
    return array


def reduce_sum(comm: Any, array: Any, root: int, cuda_aware: bool = False) -> Any:
    """Sum a contiguous array over all ranks onto ``root`` (MPI Reduce); returns the sum on
    ``root`` and None elsewhere. ``array`` is not modified.

    Parameters
    ----------
    array : numpy or cupy array, C-contiguous, the same shape and dtype on every rank.
    cuda_aware : bool
        Device arrays only: reduce the device buffers themselves rather than host copies.
    """
    if not array.flags.c_contiguous:
        raise ValueError("reduce_sum needs a C-contiguous array")
    if comm.Get_size() == 1:
        return array.copy()
    from mpi4py import MPI

    is_root = comm.Get_rank() == root
    xp = get_array_module(array)
    if _is_cupy_array(array) and cuda_aware:
        out = xp.empty_like(array) if is_root else None
        _sync(array)
        comm.Reduce(array, out, op=MPI.SUM, root=root)
        return out
    host = np.ascontiguousarray(to_host(array))
    out = np.empty_like(host) if is_root else None
    comm.Reduce(host, out, op=MPI.SUM, root=root)
    return None if out is None else to_module(out, xp)


def bcast_array(comm: Any, array: Any, root: int = 0, cuda_aware: bool = False,
                xp: Any = None) -> Any:
    """Broadcast an array from ``root`` (shape and dtype travel too); returns the array.

    Parameters
    ----------
    array : numpy or cupy array on ``root``; ignored elsewhere.
    cuda_aware : bool
        Device arrays only: broadcast the device buffer itself rather than a host copy.
    xp : module, optional
        Array module of the result on every rank; default: that of ``array`` on ``root``
        (sent with the shape and dtype).
    """
    if comm.Get_size() == 1:
        return array if xp is None or array is None else to_module(array, xp)
    on_device = _is_cupy_array(array)
    meta = comm.bcast(None if array is None else (array.shape, array.dtype.str, on_device),
                      root=root)
    shape, dtype, dev = meta
    if xp is None:
        xp = get_array_module(array) if comm.Get_rank() == root else (
            importlib.import_module("cupy") if dev else np)
    if cuda_aware and xp is not np:
        buf = xp.ascontiguousarray(array) if comm.Get_rank() == root else xp.empty(shape, dtype)
        _sync(buf)
        comm.Bcast(buf, root=root)
        return buf
    if comm.Get_rank() != root:
        host = np.empty(shape, dtype=np.dtype(dtype))
    else:
        host = np.ascontiguousarray(to_host(array))
    comm.Bcast(host, root=root)
    return to_module(host, xp)


def allgather_array(comm: Any, array: Any) -> np.ndarray:
    """Concatenate each rank's array along axis 0, in rank order, on every rank (host)."""
    if comm.Get_size() == 1:
        return np.asarray(to_host(array))
    parts = comm.allgather(np.ascontiguousarray(to_host(array)))
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------------------
# Python-object collectives (pickled): small metadata, per-rank summaries, image blocks
# of the matching ring. Every one takes the communicator and works with SerialComm.
# --------------------------------------------------------------------------------------


def allgather_objects(comm: Any, value: Any) -> list:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` on one rank)."""
    return comm.allgather(value) if comm.Get_size() > 1 else [value]


def gather_objects(comm: Any, value: Any, root: int = 0) -> list | None:
    """Every rank's ``value`` in rank order on ``root``; None elsewhere.

    On one rank: ``[value]``.
    """
    if comm.Get_size() == 1:
        return [value]
    return comm.gather(value, root=root)


def bcast_object(comm: Any, value: Any, root: int = 0) -> Any:
    """``value`` of ``root`` on every rank (the argument is ignored elsewhere)."""
    return comm.bcast(value, root=root)


def all_true(comm: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    return all(allgather_objects(comm, bool(flag)))


def ring_shift(comm: Any, value: Any) -> Any:
    """Send ``value`` to rank ``r + 1`` and return the one of rank ``r - 1`` (cyclic).

    One step of a ring (pickled ``sendrecv``): after ``size`` steps every value has
    visited every rank. On one rank it returns ``value``.
    """
    size = comm.Get_size()
    if size == 1:
        return value
    rank = comm.Get_rank()
    return comm.sendrecv(value, dest=(rank + 1) % size, source=(rank - 1) % size)


def barrier(comm: Any) -> None:
    """Wait for every rank of ``comm``."""
    comm.Barrier()


def quiet_wait(comm: Any, poll_seconds: float = 1e-3) -> float:
    """A barrier whose waiting ranks sleep instead of spinning; returns the seconds waited.

    MPI libraries wait in blocking collectives by polling, which keeps a core busy. Before
    the broadcast of a stage that one rank computes alone (the CG sweep, phasing), the
    others wait here on a non-blocking barrier tested every ``poll_seconds``, so the rank
    doing the work can use their cores (``runtime.serial_threads``). The rank that arrives
    last passes at once; the wake-up delay of the others is at most ``poll_seconds``.
    """
    t0 = time.perf_counter()
    if comm.Get_size() == 1:
        return 0.0
    ibarrier = getattr(comm, "Ibarrier", None)
    if ibarrier is None:  # a communicator without non-blocking collectives
        comm.Barrier()
        return time.perf_counter() - t0
    req = ibarrier()
    while not req.Test():
        time.sleep(poll_seconds)
    return time.perf_counter() - t0


def reduce_summary(comm: Any, summary: dict[str, float]) -> dict[str, float]:
    """Reduce a :meth:`Posterior.summary` over all ranks: sums, and the maximum of ``*_max`` keys.

    Parameters
    ----------
    comm : communicator
        Collective; every rank passes a summary with the same keys.
    summary : dict of float
        Local sums (``n`` may be 0 on a rank without images).

    Returns
    -------
    dict of float
        The same keys, identical on every rank.
    """
    keys = sorted(summary)
    sums = np.array([summary[k] for k in keys if not k.endswith("_max")], dtype=np.float64)
    allreduce_sum(comm, sums)
    maxes = [k for k in keys if k.endswith("_max")]
    out = dict(zip([k for k in keys if not k.endswith("_max")], map(float, sums)))
    if maxes:
        local = np.array([summary[k] for k in maxes], dtype=np.float64)
        if isinstance(comm, SerialComm) or comm.Get_size() == 1:
            top = local
        else:
            from mpi4py import MPI

            top = np.empty_like(local)
            comm.Allreduce(local, top, op=MPI.MAX)
        out.update(zip(maxes, map(float, top)))
    return out
