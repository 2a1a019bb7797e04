"""The command line as a user meets it: help, config printing, one-line errors, exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spinifel.cli import COMMANDS, main

BIN = Path(sys.executable).parent


def _run(args, timeout=120, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_import_has_no_side_effects():
    code = ("import sys, logging; import spinifel, spinifel.cli, spinifel.pipeline; "
            "assert 'mpi4py.MPI' not in sys.modules, 'MPI initialised at import'; "
            "assert not logging.getLogger('spinifel').handlers; print('ok')")
    r = _run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: spinifel-mpi " + cmd in out
    assert "example" in out.lower()


def test_python_m_spinifel_and_defaults():
    r = _run([sys.executable, "-m", "spinifel", "config", "--defaults"])
    assert r.returncode == 0, r.stderr
    assert "[algorithm]" in r.stdout and "# Number of M-TIP generations" in r.stdout


def test_config_prints_resolved_toml(tmp_path, capsys):
    assert main(["config", "--set", "algorithm.M=61"]) == 0
    out = capsys.readouterr().out
    assert "M = 61" in out


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    assert main(["config", "--set", "algorithm.genrations=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown config key 'algorithm.genrations'" in err[0]


@pytest.mark.skipif(not (BIN / "mpiexec").exists(), reason="no mpiexec beside this python")
def test_missing_dataset_two_ranks_exit_2_no_hang(tmp_path):
    r = _run([str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "spinifel", "run",
              "--set", f"data.path={tmp_path / 'nope.h5'}", "--out", str(tmp_path / "o")], timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, r.stderr
    assert "nope.h5" in lines[0]
    assert not (tmp_path / "o" / "result.h5").exists()
