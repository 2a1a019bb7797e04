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
