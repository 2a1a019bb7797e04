"""CUDA kernels: numpy references against brute force, nvcc compilation, GPU parity."""

import shutil
import subprocess
from importlib import resources

import numpy as np
import pytest

from spinifel.backend.kernels import KERNELS, match_fused_reference
from spinifel.orientation.matching import match_orientations

CU_FILES = sorted(KERNELS.values())


def _archs():
    """sm_70, sm_80, sm_90 where this nvcc supports them (CUDA 13 dropped sm_70: sm_75 then)."""
    out = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout
    have = {int(a.split("_")[1]) for a in out.split() if a.startswith("compute_")}
    wanted = [70 if 70 in have else 75, 80, 90]
    return [a for a in wanted if a in have]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on the PATH")
@pytest.mark.parametrize("cu", CU_FILES)
def test_kernel_compiles_with_nvcc(cu, tmp_path):
    src = resources.files("spinifel").joinpath("cuda", cu)
    archs = _archs()
    assert archs, "this nvcc supports none of sm_70/75/80/90"
    for arch in archs:
        r = subprocess.run(["nvcc", f"-arch=sm_{arch}", "-std=c++14", "-cubin", "-Werror", "all-warnings",
                            "-o", str(tmp_path / f"{cu}.{arch}.cubin"), str(src)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"sm_{arch}: {r.stderr}"


@pytest.mark.parametrize("scale", [False, True])
def test_match_fused_reference_equals_matching(scale, rng):
    n, B, P = 23, 70, 40
    images = rng.uniform(0, 3, (n, P)).astype(np.float32)
    slices = rng.uniform(0, 3, (B, P)).astype(np.float32)
    weights = (rng.uniform(0, 1, P) > 0.2).astype(np.float32)
    d, idx = match_fused_reference(images, slices, weights, scale, slice_offset=100)
    good = weights > 0
    st = match_orientations(np.ascontiguousarray(images[:, good]),
                            [(100, np.ascontiguousarray(slices[:, good]))], scale)
    assert np.array_equal(idx, st.best_index)
    assert np.allclose(d, st.best_dist, rtol=1e-5, atol=1e-4)


def _gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu() is None, reason="no CUDA GPU with CuPy")
@pytest.mark.parametrize("scale", [False, True])
def test_match_fused_gpu_parity(scale, rng):
    from spinifel.backend.kernels import match_fused_gpu

    cp = _gpu()
    images = rng.uniform(0, 3, (57, 300)).astype(np.float32)
    slices = rng.uniform(0, 3, (1000, 300)).astype(np.float32)
    weights = (rng.uniform(0, 1, 300) > 0.1).astype(np.float32)
    d_ref, i_ref = match_fused_reference(images, slices, weights, scale)
    d, i = match_fused_gpu(cp.asarray(images), cp.asarray(slices), cp.asarray(weights), scale)
    assert np.array_equal(cp.asnumpy(i), i_ref)
    # float32 accumulation over 300 pixels
    assert np.allclose(cp.asnumpy(d), d_ref, rtol=300 * np.finfo(np.float32).eps, atol=1e-2)
