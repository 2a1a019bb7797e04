"""The benchmark runs and reports every stage next to its measured limit (no timing asserted)."""

import json

from spinifel.cli import main


def test_bench_small_case(tmp_path, capsys):
    out = tmp_path / "b.json"
    png = tmp_path / "b.png"
    assert main(["bench", "--images-per-rank", "40", "--pixels", "16", "--M", "15",
                 "--orientations", "200", "--json", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    text = capsys.readouterr().out
    for stage in ("slicing", "matching", "merge_nufft", "merge_allreduce", "cg_iteration",
                  "phasing_iteration"):
        assert stage in text
    data = json.loads(out.read_text())
    r = data["ranks"][0]
    for stage in ("slicing", "matching", "merge_nufft", "cg_iteration", "phasing_iteration"):
        assert r[stage]["seconds"] > 0 and r[stage]["limit_seconds"] > 0
        assert r[stage]["fraction_of_limit"] > 0
    assert r["matching"]["unit"] == "GFLOP/s"
    assert r["fft_library"]["numpy_fft_pair"] > 0 and r["fft_library"]["scipy_fft_pair"] > 0
    c2f = r["coarse_to_fine"]
    assert "coarse-to-fine search" in text
    assert c2f["exhaustive_evaluations"] == 40 * 200  # images x fine orientations
    assert c2f["evaluations"] >= 40 * c2f["coarse_orientations"]  # the coarse pass alone
    assert c2f["evaluation_ratio"] == c2f["exhaustive_evaluations"] / c2f["evaluations"]
    assert 0 <= c2f["agreement"] <= 1 and c2f["seconds"] > 0


def test_weak_scaling_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (Path(sys.executable).parent / "mpiexec").exists():
        import pytest

        pytest.skip("no mpiexec beside this python")
    r = subprocess.run([sys.executable, str(root / "examples" / "weak_scaling.py"), "--max-ranks", "2",
                        "--images-per-rank", "20", "--pixels", "12", "--M", "15",
                        "--orientations", "100", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "weak_scaling.json").read_text())
    assert set(data) == {"1", "2"}
    assert (tmp_path / "weak_scaling.png").stat().st_size > 1000
