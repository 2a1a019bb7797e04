"""Per-rank thread settings (called from ``main()``, never at import)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("spinifel")


def configure_threads(n: int) -> dict:
    """Limit BLAS/OpenMP threads of this process to ``n`` (one rank per core by default).

    finufft and scipy.fft take their thread counts explicitly from the config; BLAS is
    limited through threadpoolctl. Returns what was set, for the log.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    info = {"threads_per_rank": n}
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(n)
        info["blas"] = [f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')})"
                        for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        info["blas"] = ["threadpoolctl missing: BLAS threads not limited"]
    log.info("threads per rank: %d; BLAS: %s", n, ", ".join(info["blas"]) or "none found")
    return info


def _read_int(path: str) -> int | None:
    """An integer from a one-line file (None: absent, unreadable or "max")."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes(meminfo: str = "/proc/meminfo",
                           cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Memory this process's node can still give, in bytes (None when unknown).

    The smaller of ``MemAvailable`` in ``meminfo`` and the headroom of the cgroup limit
    (cgroup v2 ``memory.max - memory.current``, or v1 ``memory.limit_in_bytes -
    memory.usage_in_bytes``); a batch system's job limit is a cgroup. Linux only; None on
    systems without ``meminfo``.
    """
    avail = None
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    for limit_f, used_f in (("memory.max", "memory.current"),
                            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(os.path.join(cgroup_root, limit_f))
        used = _read_int(os.path.join(cgroup_root, used_f))
        if limit is not None and used is not None and limit < 2**60:  # v1 "no limit" is huge
            room = max(limit - used, 0)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def check_memory(estimate_bytes: int, ranks_on_node: int, available_bytes: int | None = None,
                 warn_fraction: float = 0.8) -> str | None:
    """Refuse a run whose per-rank memory estimate cannot fit on its node.

    Parameters
    ----------
    estimate_bytes : int
        Estimated peak bytes of one rank (the pipeline's memory estimate).
    ranks_on_node : int
        Ranks sharing this node's memory (``ParallelContext.node_size``), >= 1.
    available_bytes : int, optional
        Memory of the node still available (default: :func:`available_memory_bytes`).
    warn_fraction : float
        Fraction of the per-rank share above which a warning is returned.

    Returns
    -------
    str or None
        A warning line when the estimate exceeds ``warn_fraction`` of the per-rank share;
        None when it fits comfortably or the available memory is unknown.

    Raises
    ------
    ConfigError
        When the estimate exceeds the per-rank share (available / ranks on the node): one
        line naming ``algorithm.M`` and the numbers, instead of an allocation failure and a
        traceback in the middle of the run.
    """
    from spinifel.errors import ConfigError

    if ranks_on_node < 1:
        raise ValueError(f"ranks_on_node must be >= 1, got {ranks_on_node}")
    avail = available_memory_bytes() if available_bytes is None else int(available_bytes)
    if avail is None:
        return None
    share = avail / ranks_on_node
    mib = 2.0**20
    numbers = (f"memory estimate per rank {estimate_bytes / mib:.1f} MiB, available "
               f"{avail / mib:.1f} MiB on this node / {ranks_on_node} rank"
               f"{'s' if ranks_on_node > 1 else ''} = {share / mib:.1f} MiB per rank")
    if estimate_bytes > share:
        raise ConfigError(f"config key 'algorithm.M': the run does not fit in memory ({numbers}); "
                          "lower algorithm.M or algorithm.orientation_batch / image_batch, or "
                          "run fewer ranks per node")
    if estimate_bytes > warn_fraction * share:
        return f"memory is tight: {numbers}"
    return None


def serial_stage_threads(requested: int, threads_per_rank: int, concurrent_jobs: int) -> int:
    """Threads for a stage that one rank computes while the others wait (CG sweep, phasing).

    ``requested`` > 0 is taken as given (``runtime.serial_threads``). 0 (auto): the CPUs this
    process may run on (its affinity mask: under ``srun``/``jsrun`` binding, the rank's own
    cores) shared by the ``concurrent_jobs`` such stages that may run at once on a node
    (the full map, and the two half maps when half sets are on), and never fewer than
    ``threads_per_rank``. The waiting ranks sleep meanwhile
    (:func:`spinifel.parallel.collectives.quiet_wait`), so their cores are free.
    """
    if requested > 0:
        return int(requested)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        cpus = os.cpu_count() or 1
    return max(int(threads_per_rank), cpus // max(int(concurrent_jobs), 1))
