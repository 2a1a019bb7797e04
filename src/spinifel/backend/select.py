"""Choosing the array and NUFFT backends of a run, binding ranks to GPUs, sizing batches.

Nothing here imports CuPy or cufinufft at module import. ``runtime.backend = "auto"``
imports CuPy only when it is installed (``importlib.util.find_spec``), to ask it how many
devices it sees; ``"numpy"`` never imports it. cufinufft is imported only once CuPy was
chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from spinifel.errors import ConfigError

log = logging.getLogger("spinifel")


@dataclass(frozen=True)
class Backends:
    """The backends of a run.

    Attributes
    ----------
    array : {"numpy", "cupy"}
        Array backend.
    xp : module
        ``numpy`` or ``cupy``.
    nufft : {"finufft", "cufinufft"}
        NUFFT library (the one that fits ``array``).
    reason : str
        Why this array backend (logged).
    skipped : dict
        NUFFT backends passed over, with the reason.
    device : int or None
        CUDA device this rank uses (None on numpy).
    """

    array: str
    xp: ModuleType
    nufft: str
    reason: str
    skipped: dict[str, str] = field(default_factory=dict)
    device: int | None = None

    @property
    def gpu(self) -> bool:
        return self.array == "cupy"


def probe_gpu() -> tuple[bool, str]:
    """Whether CuPy is installed and sees at least one CUDA device, and why not.

    Returns
    -------
    (usable, reason) : (bool, str)
        ``reason`` says what was found ("CuPy sees 4 GPUs") or what is missing.
    """
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed"
    try:
        cupy = importlib.import_module("cupy")
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # ImportError, CUDA driver/runtime errors
        return False, f"CuPy cannot use CUDA ({e.__class__.__name__}: {e})"
    if n < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"CuPy sees {n} CUDA device{'s' if n > 1 else ''}"


def select_backends(requested: str, nufft_order: Sequence[str]) -> Backends:
    """Array and NUFFT backends for ``runtime.backend`` and ``runtime.nufft_backends``.

    Parameters
    ----------
    requested : {"auto", "numpy", "cupy"}
        ``auto``: CuPy when it sees a device and a GPU NUFFT library is usable, else numpy
        (with the reason). ``cupy``: CuPy or a :class:`~spinifel.errors.ConfigError`.
    nufft_order : sequence of str
        NUFFT libraries in order of preference.

    Returns
    -------
    Backends
        With ``device`` None (see :func:`bind_device`).

    Raises
    ------
    ConfigError
        ``cupy`` requested without a usable GPU or GPU NUFFT library; no NUFFT library in
        ``nufft_order`` fits the chosen array backend.
    """
    from spinifel.backend.nufft import available_backends

    if requested == "numpy":
        nufft, skipped = _nufft_or_error(available_backends, nufft_order, False)
        return Backends("numpy", np, nufft, "runtime.backend = numpy", skipped)
    if requested not in ("auto", "cupy"):
        raise ConfigError(f"config key 'runtime.backend': must be 'auto', 'numpy' or 'cupy', "
                          f"got {requested!r}")
    ok, why = probe_gpu()
    if ok:
        try:
            nufft, skipped = available_backends(nufft_order, want_gpu=True)
        except RuntimeError as e:
            if requested == "cupy":
                raise ConfigError(f"config key 'runtime.nufft_backends': {e} (runtime.backend = "
                                  "cupy needs 'cufinufft': pip install .[gpu])") from None
            ok, why = False, f"{why} but {e}"
        else:
            cupy = importlib.import_module("cupy")
            return Backends("cupy", cupy, nufft, f"runtime.backend = {requested}: {why}", skipped)
    if requested == "cupy":
        raise ConfigError(f"config key 'runtime.backend': 'cupy' needs a CUDA GPU with CuPy: {why} "
                          "(install with pip install .[gpu], or use 'auto' or 'numpy')")
    nufft, skipped = _nufft_or_error(available_backends, nufft_order, False)
    return Backends("numpy", np, nufft, f"runtime.backend = auto: {why}", skipped)


def _rank_ranges(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and int(out[-1].split("-")[-1]) == r - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)


def mixed_gpu_warning(gpu: Sequence[bool], reasons: Sequence[str] | None = None) -> str | None:
    """Warning text when some ranks could use a GPU and others could not.

    Under ``runtime.backend = "auto"`` all ranks fall back to numpy when any rank lacks a
    GPU; that must not pass silently on a GPU machine.

    Parameters
    ----------
    gpu : sequence of bool, one per rank (rank order)
        Whether each rank's :func:`select_backends` chose CuPy.
    reasons : sequence of str, optional
        Each rank's :attr:`Backends.reason`; the first reason of a rank without GPU is
        quoted.

    Returns
    -------
    str or None
        None when every rank or no rank has a GPU (nothing mixed to report), else one line
        naming the ranks without a GPU (as ranges), their count and why.
    """
    flags = [bool(g) for g in gpu]
    if all(flags) or not any(flags):
        return None
    missing = [r for r, g in enumerate(flags) if not g]
    why = ""
    if reasons is not None:
        why = f" (rank {missing[0]}: {reasons[missing[0]]})"
    return (f"runtime.backend = auto: {len(missing)} of {len(flags)} ranks cannot use a GPU "
            f"(ranks {_rank_ranges(missing)}){why}; every rank runs on the CPU (numpy). "
            "Fix those ranks' CUDA/CuPy setup, or set runtime.backend = \"numpy\" to "
            "silence this")


def _nufft_or_error(available_backends, order, want_gpu):
    try:
        return available_backends(order, want_gpu=want_gpu)
    except RuntimeError as e:
        raise ConfigError(f"config key 'runtime.nufft_backends': {e}") from None


def device_for_rank(node_rank: int, n_devices: int) -> int:
    """CUDA device of a rank: its node-local rank modulo the devices it sees.

    With one rank per GPU (``srun --gpus-per-task=1 --gpu-bind=none``: every rank sees all
    the node's GPUs) node-local rank ``r`` takes GPU ``r``; with more ranks than GPUs they
    share round-robin; with one visible device (``jsrun -g1``, or a launcher that sets
    ``CUDA_VISIBLE_DEVICES`` per rank) every rank takes device 0.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if node_rank < 0:
        raise ValueError(f"node_rank must be >= 0, got {node_rank}")
    return node_rank % n_devices


def bind_device(backends: Backends, node_rank: int, node_size: int) -> Backends:
    """Make this rank's CUDA device current (no-op on numpy); returns ``backends`` with it.

    ``node_rank``/``node_size`` come from the MPI shared-memory split
    (:attr:`spinifel.parallel.context.ParallelContext.node_comm`).
    """
    if not backends.gpu:
        return backends
    cupy = backends.xp
    n = int(cupy.cuda.runtime.getDeviceCount())
    dev = device_for_rank(node_rank, n)
    cupy.cuda.Device(dev).use()
    per_gpu = math.ceil(node_size / n)
    log.info("node-local rank %d of %d -> CUDA device %d of %d visible (up to %d rank%s per GPU)",
             node_rank, node_size, dev, n, per_gpu, "s" if per_gpu > 1 else "")
    return Backends(backends.array, backends.xp, backends.nufft, backends.reason,
                    dict(backends.skipped), dev)


# Bytes per orientation per pixel of one slicing + matching batch on the device, in units
# of the real item size: the three point coordinates (3), the complex NUFFT output (2), the
# real slice (1) and its transformed copy (1) ...
ORIENTATION_ITEMS_PER_PIXEL = 7
# ... plus, per NUFFT point, cufinufft's two int32 sort/index arrays.
NUFFT_BYTES_PER_POINT = 8
# Bytes per image per pixel of one merge batch (always float64/complex128): the three point
# coordinates (3 x 8), their rotation temporary (8), the float64 image and weighted values
# (2 x 8) and the complex values of one type-1 NUFFT (16); measured on the numpy path at
# 64.5 (tests/test_gpu_path.py); rounded up for the NUFFT's point indices.
IMAGE_BYTES_PER_PIXEL = 80


def batch_caps(free_bytes: int, n_pixels: int, precision: str, fraction: float = 0.5
               ) -> tuple[int, int]:
    """Largest orientation and image batches that fit in a share of free device memory.

    Parameters
    ----------
    free_bytes : int
        Free device memory (``cupy.cuda.Device().mem_info[0]``), measured after the images
        were moved to the device.
    n_pixels : int
        Good pixels per image.
    precision : {"single", "double"}
        ``runtime.precision`` (the item size of slices and images).
    fraction : float
        Share of ``free_bytes`` one stage may use, in (0, 1]: the rest is headroom for the
        NUFFT's fine grid, cuFFT work areas and the memory pool's fragmentation.

    Returns
    -------
    (orientation_batch, image_batch) : (int, int)
        Caps (>= 1) to apply to ``algorithm.orientation_batch`` and ``algorithm.image_batch``;
        the stages run one after the other, so each may use the whole share.
    """
    if precision not in ("single", "double"):
        raise ValueError(f"precision must be 'single' or 'double', got {precision!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_pixels < 1:
        raise ValueError(f"n_pixels must be >= 1, got {n_pixels}")
    item = 4 if precision == "single" else 8
    budget = max(int(free_bytes), 0) * fraction
    per_orientation = n_pixels * (ORIENTATION_ITEMS_PER_PIXEL * item + NUFFT_BYTES_PER_POINT)
    per_image = n_pixels * IMAGE_BYTES_PER_PIXEL
    return max(1, int(budget // per_orientation)), max(1, int(budget // per_image))


def free_device_bytes(xp: Any) -> int | None:
    """Free memory of the current CUDA device in bytes (None on numpy).

    Blocks cached by CuPy's memory pool count as free (they are reusable by this process).
    """
    if xp is np:
        return None
    free, _total = xp.cuda.Device().mem_info
    return int(free) + int(xp.get_default_memory_pool().free_bytes())


def release_memory_pool(xp: Any) -> None:
    """Give CuPy's cached, unused device blocks back to the driver (no-op on numpy).

    Called between stages whose working sets differ (matching's slice batches, the merge's
    NUFFT buffers) so that one stage's cache does not crowd out the next, and so that
    several ranks sharing a GPU see each other's freed memory.
    """
    if xp is np:
        return
    xp.get_default_memory_pool().free_all_blocks()
    xp.get_default_pinned_memory_pool().free_all_blocks()
