"""The parallel context: the one object that owns MPI for a run.

It creates the communicators (world and node-local), knows the rank and size, installs
an excepthook that logs the failing rank's error and calls ``Abort`` so that an exception
on one rank never leaves the others hanging in a collective, and offers the handful of
collectives the pipeline needs. Numerical modules never import mpi4py: they receive a
context (or its ``comm``) as an argument.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("spinifel")


class SerialComm:
    """A stand-in for an mpi4py communicator with one rank (tests, serial tools).

    Implements the subset of the lower-case mpi4py API used by spinifel.
    """

    rank = 0
    size = 1

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py naming
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = None) -> None:  # noqa: N802
        import numpy as np

        if sendbuf is not _IN_PLACE:
            np.copyto(recvbuf, sendbuf)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802
        return None

    def allgather(self, obj: Any) -> list:
        return [obj]

    def gather(self, obj: Any, root: int = 0) -> list:
        return [obj]

    def Barrier(self) -> None:  # noqa: N802
        return None

    def sendrecv(self, sendobj: Any, dest: int = 0, source: int = 0) -> Any:
        return sendobj

    def barrier(self) -> None:
        return None

    def Abort(self, errorcode: int = 1) -> None:  # noqa: N802
        raise SystemExit(errorcode)


_IN_PLACE = object()


def in_place(comm: Any) -> Any:
    """The ``MPI.IN_PLACE`` sentinel suitable for ``comm`` (works for :class:`SerialComm`)."""
    if isinstance(comm, SerialComm):
        return _IN_PLACE
    from mpi4py import MPI

    return MPI.IN_PLACE


@dataclass
class ParallelContext:
    """Communicators and rank information of one run.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm or SerialComm
        The world communicator of the job (all ranks).
    node_comm : mpi4py.MPI.Comm or SerialComm
        Ranks sharing a node (``MPI.COMM_TYPE_SHARED`` split); used to bind ranks to GPUs.
    """

    comm: Any
    node_comm: Any = field(default_factory=SerialComm)

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return int(self.node_comm.Get_rank())

    @property
    def node_size(self) -> int:
        return int(self.node_comm.Get_size())

    @classmethod
    def serial(cls) -> "ParallelContext":
        """A one-rank context that never touches MPI."""
        return cls(comm=SerialComm(), node_comm=SerialComm())

    @classmethod
    def from_world(cls) -> "ParallelContext":
        """The context of ``MPI.COMM_WORLD`` (initialises MPI on first use)."""
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        return cls(comm=world, node_comm=node)

    def install_excepthook(self) -> None:
        """Make an uncaught exception on any rank log the rank and abort the whole job."""
        if self.size == 1:
            return
        previous = sys.excepthook

        def hook(exc_type, exc, tb):  # pragma: no cover - exercised in subprocess tests
            try:
                text = "".join(traceback.format_exception(exc_type, exc, tb))
                sys.stderr.write(f"[rank {self.rank}/{self.size}] fatal error, aborting job:\n{text}")
                sys.stderr.flush()
            finally:
                try:
                    self.comm.Abort(1)
                finally:
                    previous(exc_type, exc, tb)

        sys.excepthook = hook

    def abort(self, code: int = 1) -> None:
        """End the whole job (all ranks) with ``code``."""
        if self.size == 1:
            raise SystemExit(code)
        self.comm.Abort(code)


def agree_on_errors(comm: Any, error: BaseException | None) -> None:
    """Collective: if any rank hit a user error, raise the same error on every rank.

    Each rank passes the :class:`~spinifel.errors.SpinifelError` it caught (or None).
    The lowest rank's error is re-raised everywhere, marked ``collective = True`` so the
    command line exits cleanly with code 2 on all ranks instead of aborting.
    """

    payload = None if error is None else (type(error).__name__, str(error))
    everyone = comm.allgather(payload) if comm.Get_size() > 1 else [payload]
    for item in everyone:
        if item is not None:
            if error is not None and payload == item:
                err = error
            else:
                err = _rebuild_error(item[0], item[1])
            err.collective = True
            raise err
    return None


def _rebuild_error(name: str, message: str) -> BaseException:
    from spinifel import errors

    cls = getattr(errors, name, errors.SpinifelError)
    if not (isinstance(cls, type) and issubclass(cls, errors.SpinifelError)):
        cls = errors.SpinifelError
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def collective(comm: Any, fn, *args, **kwargs):
    """Run ``fn`` on every rank; a SpinifelError on any rank is raised on all of them."""
    from spinifel.errors import SpinifelError

    try:
        result, err = fn(*args, **kwargs), None
    except SpinifelError as e:
        result, err = None, e
    agree_on_errors(comm, err)
    return result


def on_root(comm: Any, fn, *args, root: int = 0, **kwargs):
    """Run ``fn`` on ``root`` only and broadcast its result; its SpinifelError reaches all ranks."""
    from spinifel.errors import SpinifelError

    result, err = None, None
    if comm.Get_rank() == root:
        try:
            result = fn(*args, **kwargs)
        except SpinifelError as e:
            err = e
    agree_on_errors(comm, err)
    return comm.bcast(result, root=root) if comm.Get_size() > 1 else result


def init_mpi() -> None:
    """Import ``mpi4py.MPI``, which initialises MPI (for the commands that need it)."""
    from mpi4py import MPI  # noqa: F401


def world() -> tuple[int, int, Any]:
    """``(rank, size, comm)`` of ``MPI.COMM_WORLD`` when MPI is in use, else ``(0, 1, None)``.

    "In use" means ``mpi4py.MPI`` was imported already (see :func:`init_mpi`); this never
    initialises MPI itself, so serial commands run without an MPI library.
    """
    import sys

    if "mpi4py.MPI" not in sys.modules:
        return 0, 1, None
    from mpi4py import MPI

    w = MPI.COMM_WORLD
    return w.Get_rank(), w.Get_size(), w
