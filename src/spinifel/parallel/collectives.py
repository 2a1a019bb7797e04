"""The few collectives the pipeline needs, on numpy buffers (works with SerialComm too)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spinifel.parallel.context import SerialComm, in_place


def allreduce_sum(comm: Any, array: np.ndarray) -> np.ndarray:
    """Sum a contiguous numpy array over all ranks, in place; returns it."""
    if not array.flags.c_contiguous:
        raise ValueError("allreduce_sum needs a C-contiguous array")
    if isinstance(comm, SerialComm) or comm.Get_size() == 1:
        return array
    from mpi4py import MPI

    comm.Allreduce(in_place(comm), array, op=MPI.SUM)
    return array


def bcast_array(comm: Any, array: np.ndarray | None, root: int = 0) -> np.ndarray:
    """Broadcast an array from ``root`` (shape and dtype travel too); returns the array."""
    if isinstance(comm, SerialComm) or comm.Get_size() == 1:
        return array
    meta = comm.bcast(None if array is None else (array.shape, array.dtype.str), root=root)
    if comm.Get_rank() != root:
        array = np.empty(meta[0], dtype=np.dtype(meta[1]))
    else:
        array = np.ascontiguousarray(array)
    comm.Bcast(array, root=root)
    return array


def allgather_array(comm: Any, array: np.ndarray) -> np.ndarray:
    """Concatenate each rank's array along axis 0, in rank order, on every rank."""
    if isinstance(comm, SerialComm) or comm.Get_size() == 1:
        return np.asarray(array)
    parts = comm.allgather(np.ascontiguousarray(array))
    return np.concatenate(parts, axis=0)
