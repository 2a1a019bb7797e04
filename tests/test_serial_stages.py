"""Stages one rank computes while the others wait: the sleeping barrier and the threads."""

import time

import numpy as np
import pytest

from spinifel.runtime import serial_stage_threads


def test_serial_stage_threads_auto_shares_the_affinity_mask(monkeypatch):
    """Catches auto threads ignoring the rank's CPU mask (oversubscribing a bound rank),
    not sharing it between concurrent serial stages, or dropping below threads_per_rank."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert serial_stage_threads(0, 1, 1) == 8
    assert serial_stage_threads(0, 1, 3) == 2  # three maps phased at once on the node
    assert serial_stage_threads(0, 4, 3) == 4  # never fewer than threads_per_rank
    assert serial_stage_threads(6, 1, 1) == 6  # an explicit value is taken as given
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert serial_stage_threads(0, 1, 1) == 1  # a rank bound to one core


def test_fft_workers_do_not_change_the_transform(rng):
    """Catches the threaded FFT of the serial stages giving other numbers than one thread
    (results must not depend on runtime.serial_threads): bit-identical transforms."""
    import scipy.fft

    from spinifel.backend.arrays import fft_workers

    x = rng.normal(size=(33, 34, 35))
    one = scipy.fft.rfftn(x)
    with fft_workers(np, 2):
        two = scipy.fft.rfftn(x)
        assert scipy.fft.get_workers() == 2
    assert scipy.fft.get_workers() == 1
    assert np.array_equal(one, two)


class _Request:
    def __init__(self, n_tests: int) -> None:
        self.left = n_tests

    def Test(self) -> bool:  # noqa: N802 - mpi4py naming
        self.left -= 1
        return self.left <= 0


class _Comm:
    """Two ranks whose non-blocking barrier completes at the fifth test; Barrier is an error."""

    def Get_size(self) -> int:  # noqa: N802
        return 2

    def Ibarrier(self) -> _Request:  # noqa: N802
        return _Request(5)

    def Barrier(self) -> None:  # noqa: N802
        raise AssertionError("a blocking barrier spins in most MPI libraries")


def test_quiet_wait_polls_with_sleeps(monkeypatch):
    """Catches quiet_wait using a blocking (spinning) barrier or polling without sleeping."""
    from spinifel.parallel import collectives

    naps = []
    monkeypatch.setattr(collectives.time, "sleep", naps.append)
    collectives.quiet_wait(_Comm(), poll_seconds=0.002)
    assert naps == [0.002] * 4


@pytest.mark.mpi(min_size=2)
def test_quiet_wait_sleeps_until_the_last_rank():
    """Catches the waiting ranks spinning in MPI (a blocking Barrier polls and burns their
    CPU, which the working rank's threads need; measured with this MPICH: 0.49 s of CPU in
    1 s of waiting on a loaded machine, a full core on an idle one) or not waiting for the
    last rank: rank 0 works 0.6 s, the others must wait that long using little CPU."""
    from mpi4py import MPI

    from spinifel.parallel.collectives import quiet_wait

    comm = MPI.COMM_WORLD
    comm.Barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    if comm.Get_rank() == 0:
        time.sleep(0.6)
    quiet_wait(comm)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if comm.Get_rank() != 0:
        assert wall >= 0.59, wall
        assert cpu < 0.12, cpu  # polled with 1 ms sleeps: a few percent of the wait
