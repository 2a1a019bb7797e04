"""The benchmark runs and reports every stage next to its measured limit (no timing asserted)."""

import json

import numpy as np
import pytest

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
    me = r["merge_eps"]
    assert me["eps"] == [1e-6, 1e-4] and all(t > 0 for t in me["eps_seconds"])
    assert me["speedup_vs_first"][0] == 1.0
    # the Poisson path: likelihood against its GEMMs, the probabilistic merge per kept count
    assert "likelihood" in text and r["likelihood"]["limit_seconds"] > 0
    assert r["likelihood_k512_beta0.001"]["kept"] == 512
    for k in (1, 8, 64):
        pm = r[f"probabilistic_merge_k{k}"]
        assert pm["kept_pairs"] == 40 * k and 0 < pm["active_orientations"] <= min(40 * k, 200)
        assert pm["seconds"] > 0 and pm["ratio_to_hard_merge"] > 0
    assert r["fft_library"]["numpy_fft_pair"] > 0 and r["fft_library"]["scipy_fft_pair"] > 0
    c2f = r["coarse_to_fine"]
    assert "coarse-to-fine search" in text
    assert c2f["exhaustive_evaluations"] == 40 * 200  # images x fine orientations
    assert c2f["evaluations"] >= 40 * c2f["coarse_orientations"]  # the coarse pass alone
    assert c2f["evaluation_ratio"] == c2f["exhaustive_evaluations"] / c2f["evaluations"]
    assert 0 <= c2f["agreement"] <= 1 and c2f["seconds"] > 0
    pol = r["polar_search"]
    assert "polar search" in text and pol["seconds"] > 0 and pol["limit_seconds"] > 0
    assert set(pol["limit_parts"]) == {"slicing", "gemm", "fft", "rescoring"}
    assert pol["orientations"] == pol["directions"] * pol["n_psi"]
    assert abs(pol["orientations"] - 200) <= pol["n_psi"]
    # the comparison runs on the whole (small) grid by default
    assert pol["agreement"]["sub_orientations"] == pol["orientations"]
    assert 0 <= pol["agreement"]["within_one_step"] <= 1


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


def test_compare_matching_agrees_with_brute_force_and_peers(rng):
    """Ours, faiss and scikit-learn against a float64 brute-force argmin."""
    pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install .[compare])")
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install .[compare])")
    from spinifel.bench.compare import compare_matching, format_compare

    # well-separated slices so that float32 cannot flip the answer
    slices = rng.standard_normal((300, 64)).astype(np.float32)
    truth = rng.integers(0, 300, 120)
    images = slices[truth] + 0.05 * rng.standard_normal((120, 64)).astype(np.float32)
    d = ((images[:, None, :].astype(np.float64) - slices[None].astype(np.float64)) ** 2).sum(-1)
    brute = d.argmin(axis=1)
    assert np.array_equal(brute, truth)
    res = compare_matching(images, slices, threads=1, batch=70)
    for name in ("ours", "faiss", "sklearn"):
        assert res[name]["agreement"] == 1.0, name
        assert res[name]["seconds"] > 0
    text = format_compare(res)
    assert "faiss" in text and "sklearn" in text


def test_bench_compare_cli(tmp_path, capsys):
    pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install .[compare])")
    out = tmp_path / "b.json"
    assert main(["bench", "--images-per-rank", "30", "--pixels", "16", "--M", "15",
                 "--orientations", "200", "--compare", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ours is x faster" in text and "peak RSS per rank" in text
    cmp = json.loads(out.read_text())["ranks"][0]["compare_matching"]
    # synthetic exact model images at random orientations: near-ties are possible between
    # neighbouring grid slices, but the peers solve the same float32 problem
    assert cmp["faiss"]["agreement"] >= 0.9 and cmp["sklearn"]["agreement"] >= 0.9


def test_bench_poisson_only(tmp_path, capsys):
    """Catches --poisson-only losing the likelihood cases or the merge cost per kept
    orientation that docs/performance.md is generated from."""
    out = tmp_path / "p.json"
    assert main(["bench", "--poisson-only", "--images-per-rank", "30", "--pixels", "16",
                 "--M", "15", "--orientations", "300", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--poisson-only" in text and "per active orientation" in text
    d = json.loads(out.read_text())
    r = d["ranks"][0]
    assert "commit" in d and d["args"]["photons"] == 1000.0
    cases = {(v["kept"], v["beta"]) for k, v in r.items() if k.startswith("likelihood")}
    assert cases == {(64, 1.0), (1, 1.0), (512, 1.0), (512, 1e-3)}
    for k, v in r.items():
        if k.startswith("likelihood"):
            assert v["seconds"] > 0 and v["limit_seconds"] > 0 and v["fraction_of_limit"] > 0
    for k in (1, 8, 64):
        pm = r[f"probabilistic_merge_k{k}"]
        assert pm["kept_pairs"] == 30 * k and pm["seconds_per_active_orientation"] > 0


def test_bench_polar_only(tmp_path, capsys):
    """Catches --polar-only losing the JSON fields docs/performance.md is generated from."""
    out = tmp_path / "p.json"
    assert main(["bench", "--polar-only", "--images-per-rank", "20", "--pixels", "16", "--M", "15",
                 "--orientations", "200", "--agreement-directions", "5", "--json", str(out)]) == 0
    assert "polar search" in capsys.readouterr().out
    d = json.loads(out.read_text())
    r = d["ranks"][0]["polar_search"]
    assert "commit" in d and len(d["load_average"]) == 3
    for key in ("seconds", "cpu_seconds", "limit_seconds", "fraction_of_limit"):
        assert r[key] > 0
    assert set(r["parts"]) == {"grid", "slicing", "rescoring", "correlation"}
    assert r["agreement"]["sub_directions"] == 5
    assert r["agreement"]["sub_orientations"] == 5 * r["n_psi"]
