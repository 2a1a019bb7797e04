"""Load: peak memory stays flat over many generations (no per-generation leak)."""

import json
import os
import subprocess
import sys

import numpy as np

from spinifel.simulate.dataset import simulate_dataset
from spinifel.simulate.structure import builtin_molecule


def test_peak_rss_flat_over_generations(tmp_path):
    data = tmp_path / "d.h5"
    simulate_dataset(data, builtin_molecule(seed=2, n_atoms=300), n_images=300, n_pixels=16,
                     pixel_size_m=6e-3, M=41, seed=0)
    out = tmp_path / "out"
    sets = {"algorithm.M": 41, "algorithm.generations": 20, "algorithm.n_orientations": 300,
            "algorithm.n_phase_loops": 1, "algorithm.n_er": 5, "algorithm.n_hio": 5,
            "algorithm.n_final_er": 5, "algorithm.refine_generations": 0,
            "algorithm.lambdas": [1e-2], "algorithm.cg_max_iter": 10, "output.mrc": False}
    cmd = [sys.executable, "-m", "spinifel", "run", "--out", str(out), "--set", f"data.path={data}"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    gens = json.loads((out / "metrics.json").read_text())["generations"]
    peaks = [g["peak_rss_mib"][0] for g in gens]
    print("peak RSS per generation (MiB):", peaks)
    # After the first generations have touched every buffer (allocator warm-up), the peak
    # must not creep up. A leak of one M^3 float64 grid per generation would be a slope of
    # 0.53 MiB/generation; the allocator's occasional 0.5 MiB steps give < 0.1 over 14.
    slope = np.polyfit(np.arange(6, len(peaks)), peaks[6:], 1)[0]
    assert slope < 0.25, slope


_MATCH_SCRIPT = """
import resource, sys
import numpy as np
from spinifel.bench.runner import synthetic_problem
from spinifel.geometry.orientations import orientation_grid
from spinifel.orientation.matching import match_orientations
from spinifel.orientation.slicing import Slicer
K = int(sys.argv[1])
p = synthetic_problem(31, 32, 400, 0, np.float32)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sl = Slicer(p["ac"], p["positions"], p["extent"], 1e-4, np.float32)
match_orientations(p["images"], sl.iter_batches(orientation_grid(K), 500), True, 4096, "sqrt")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024.0)
"""


def test_matching_memory_does_not_grow_with_orientations():
    """Peak memory of slicing + matching is set by the batch sizes, not by N_orientations."""
    growth = {}
    for k in (2000, 20000):
        r = subprocess.run([sys.executable, "-c", _MATCH_SCRIPT, str(k)], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        growth[k] = float(r.stdout.strip().splitlines()[-1])
    print("peak RSS growth during matching (MiB):", growth)
    # 10x the orientations: all slices at once would need 20000 x 1024 x 4 B = 78 MiB more.
    assert growth[20000] - growth[2000] < 10.0
