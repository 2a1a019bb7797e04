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
