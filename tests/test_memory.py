"""Load: live memory stays flat over generations (no per-generation leak)."""

import json
import os
import subprocess
import sys

import numpy as np

from spinifel.simulate.dataset import simulate_dataset
from spinifel.simulate.structure import builtin_molecule

_GENERATIONS_SCRIPT = """
import gc, json, sys, tracemalloc
from spinifel.config import load_config
from spinifel.io import checkpoint, output
from spinifel.parallel.context import ParallelContext
from spinifel.pipeline import MTIPSolver, Problem, SolverState
from spinifel.pipeline.handlers import HandlerSet
cfg = load_config(None, sys.argv[1:])
problem = Problem.open(cfg, ParallelContext.serial())
out_dir = output.prepare_output_dir(cfg.output.dir)
problem.load()
fp = checkpoint.fingerprint(cfg, problem.n_images, problem.geom.shape)
solver = MTIPSolver(problem, SolverState.initial(problem))
handlers = list(HandlerSet.default(problem, out_dir, [], fp))
live = []
while solver.proceed:
    if solver.generation == 2:
        tracemalloc.start(1)  # after the warm-up generations: every buffer exists once
    report = solver.step()
    for h in handlers:
        h(solver, report)
    report = None
    gc.collect()
    live.append(tracemalloc.get_traced_memory()[0] / 2.0**20)
print(json.dumps(live[2:]))
"""


def test_live_memory_flat_over_generations(tmp_path):
    """Catches a per-generation leak: anything the solver, its state or a handler keeps
    from each generation (previous reports, arrays in the metrics history, closures over
    stage buffers, ...).

    Live Python-heap memory (tracemalloc, which also sees numpy's data buffers) is sampled
    after each generation of a run with every default handler, once the warm-up
    generations have allocated every buffer. Its growth must stay below a quarter of one
    M^3 float64 grid per generation; the metrics history legitimately grows by ~1 KiB
    per generation. Unlike the peak RSS (``ru_maxrss``), this does not move with the
    allocator's fragmentation or with other processes' load.
    """
    M, G = 41, 8
    data = tmp_path / "d.h5"
    simulate_dataset(data, builtin_molecule(seed=2, n_atoms=300), n_images=300, n_pixels=16,
                     pixel_size_m=6e-3, M=M, seed=0)
    sets = {"algorithm.M": M, "algorithm.generations": G, "algorithm.n_orientations": 300,
            "algorithm.n_phase_loops": 1, "algorithm.n_er": 5, "algorithm.n_hio": 5,
            "algorithm.n_final_er": 5, "algorithm.refine_generations": 0,
            "algorithm.lambdas": [1e-2], "algorithm.cg_max_iter": 10, "output.mrc": False,
            "output.progress_png": False, "data.path": str(data),
            "output.dir": str(tmp_path / "out")}
    cmd = [sys.executable, "-c", _GENERATIONS_SCRIPT]
    cmd += [f"{k}={json.dumps(v)}" for k, v in sets.items()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    live = json.loads(r.stdout.strip().splitlines()[-1])
    print("live traced memory after generations 2..%d (MiB):" % (G - 1), live)
    assert len(live) == G - 2
    grid_mib = M**3 * 8 / 2.0**20  # one leaked grid per generation: slope 0.53 MiB
    slope = np.polyfit(np.arange(len(live)), live, 1)[0]
    assert slope < 0.25 * grid_mib, (slope, grid_mib)


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
