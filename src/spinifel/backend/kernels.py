"""Our CUDA kernels: sources shipped in ``spinifel/cuda``, compiled with ``cupy.RawModule``.

CuPy is imported only when a kernel is actually requested on a GPU; importing this module
needs neither CuPy nor a GPU. Each kernel has a numpy reference used by the tests and by
the parity check.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

KERNELS = {"match_fused": "match_fused.cu"}


def kernel_source(name: str) -> str:
    """CUDA source text of kernel ``name``."""
    return resources.files("spinifel").joinpath("cuda", KERNELS[name]).read_text()


@lru_cache(maxsize=None)
def load_kernel(name: str):
    """Compiled ``cupy.RawKernel`` of ``name`` (cached; CuPy caches the binary on disk too)."""
    import cupy

    module = cupy.RawModule(code=kernel_source(name), options=("-std=c++14",))
    return module.get_function(name)


def match_fused_reference(images: np.ndarray, slices: np.ndarray, weights: np.ndarray,
                          scale_per_image: bool = False, slice_offset: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """What ``match_fused.cu`` computes, in numpy (float64 accumulation).

    Parameters
    ----------
    images : (n, P) float32; slices : (B, P) float32; weights : (P,) float32, 0 = masked.

    Returns
    -------
    (best_dist (n,) float64, best_index (n,) int64): per image the smallest weighted squared
    distance (or, with ``scale_per_image``, ``||x||^2 - max(x.y, 0)^2 / ||y||^2``) and the
    index of that slice plus ``slice_offset``; ties go to the lower index.
    """
    x = np.asarray(images, dtype=np.float64)
    y = np.asarray(slices, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    xy = (x * w) @ y.T
    yy = ((y * w) * y).sum(1)
    xx = ((x * w) * x).sum(1)
    if scale_per_image:
        pos = np.maximum(xy, 0)
        d = xx[:, None] - np.divide(pos * pos, yy[None, :], out=np.zeros_like(pos),
                                    where=yy[None, :] > 0)
    else:
        d = xx[:, None] + yy[None, :] - 2 * xy
    idx = np.argmin(d, axis=1)
    return d[np.arange(len(x)), idx], idx + slice_offset


def match_fused_gpu(images, slices, weights, scale_per_image: bool = False,
                    slice_offset: int = 0, block: int = 256):
    """Run ``match_fused.cu`` on CuPy arrays; returns (best_dist, best_index) as CuPy arrays."""
    import cupy

    n, P = images.shape
    B = slices.shape[0]
    keys = cupy.full(n, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=cupy.uint64)
    kern = load_kernel("match_fused")
    kern((n, (B + block - 1) // block), (block,),
         (cupy.ascontiguousarray(images, dtype=cupy.float32),
          cupy.ascontiguousarray(slices, dtype=cupy.float32),
          cupy.ascontiguousarray(weights, dtype=cupy.float32),
          np.int32(n), np.int32(B), np.int32(P), np.int32(slice_offset),
          np.int32(bool(scale_per_image)), keys), shared_mem=8 * block)
    idx = (keys & np.uint64(0xFFFFFFFF)).astype(cupy.int64)
    hi = (keys >> np.uint64(32)).astype(cupy.uint32)
    # undo the order-preserving float encoding
    u = cupy.where(hi & np.uint32(0x80000000), hi & np.uint32(0x7FFFFFFF), ~hi)
    return u.view(cupy.float32).astype(cupy.float64), idx
