"""The docs' tables of photon-limited runs, lambda runs and the Poisson bench, generated
from the JSONs the program wrote (scripts/photon_table.py, lambda_table.py,
poisson_bench_table.py)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, name: str, lam: float, ev: dict, commit: str = "abc1234") -> None:
    d = folder / name
    d.mkdir(parents=True)
    gens = [{"generation": 0, "lambda_rel": lam, "timings": {"slicing": 30.0, "phasing": 30.0},
             "evaluation": {}},
            {"generation": 1, "lambda_rel": lam, "timings": {"slicing": 30.0, "phasing": 30.0},
             "evaluation": ev, "orientation_change": 0.05}]
    (d / "metrics.json").write_text(json.dumps({"generations": gens, "n_images": 2000,
                                                "n_generations": 2, "grid_spacing_deg": 14.4}))
    (d / "config.toml").write_text(f'[data]\npath = "/x/2cex_p10000.h5"\n[algorithm]\nM = 51\n'
                                   f'lambdas = [{lam}]\nn_orientations = 5000\n')
    (d / "provenance.json").write_text(json.dumps({"commit": commit, "command": "mpiexec ..."}))


EV = {"density_correlation": 0.8812, "fsc_resolution_0p5_angstrom": 7.04,
      "fsc_resolution_0p143_angstrom": None,
      "fsc_resolution_0p143_better_than_angstrom": 6.53,
      "orientation_error_deg": {"median": 2.21, "p90": 5.04}}


def test_photon_summary_rows_say_not_run_and_not_reached(tmp_path):
    """Catches a missing run shown with numbers, an FSC that never crossed printed as a
    resolution, or the commit not taken from the run's provenance."""
    pt = _module("photon_table")
    _run(tmp_path, "p10000_n5000_euclidean_defaults", 0.1, EV, commit="def5678")
    text = pt.summary(tmp_path)
    lines = {ln.split("|")[3].strip(): ln for ln in text.splitlines()[2:]}
    row = lines["`p10000_n5000_euclidean_defaults`"]
    assert "| 0.881 | 7.0 A | not reached (better than 6.5 A) | 2.2 | 5.0 | 2 | def5678 | - |" in row
    assert "| not run |" in lines["`p500_n5000_refine_example`"]
    assert len(lines) == 13  # six rows x two engines (five photon counts, the jitter row), and
    # the jitter row before the background fix


def test_lambda_table_sorted_by_lambda_with_choices(tmp_path):
    """Catches rows out of lambda order, the per-generation choice missing, or the last
    generation's numbers not the ones quoted."""
    lt = _module("lambda_table")
    _run(tmp_path, "l1", 1.0, dict(EV, density_correlation=0.7))
    _run(tmp_path, "l001", 0.01, dict(EV, density_correlation=0.8))
    assert lt.main([str(tmp_path)]) == 0
    text = "\n".join(r for _, r in sorted(lt.row(d) for d in tmp_path.iterdir()))
    first, second = text.splitlines()
    assert first.startswith("| `l001` |") and "| 0.01 | 0.01, 0.01 | 2 | 0.800 |" in first
    assert second.startswith("| `l1` |") and "| 0.700 | 7.0 A | not reached" in second


def test_poisson_bench_table_quotes_every_rank(tmp_path):
    """Catches a likelihood case or a rank left out, the conservative fraction not taken
    against the fastest limit of the run, or the merge's per-orientation cost printed in
    the wrong unit."""
    pb = _module("poisson_bench_table")
    lik = {"seconds": 2.0, "limit_seconds": 1.5, "fraction_of_limit": 0.75, "kept": 512,
           "beta": 0.001, "numpy_passes_seconds": 2.7}
    pm = {"seconds": 3.0, "kept_per_image": 8, "active_orientations": 1500,
          "seconds_per_active_orientation": 0.002, "seconds_per_kept_pair": 3e-4,
          "ratio_to_hard_merge": 1.2}
    lik64 = dict(lik, limit_seconds=1.2, kept=64, beta=1.0)
    rank = {"likelihood": lik64, "likelihood_k512_beta0.001": lik,
            "merge_nufft": {"seconds": 2.5, "eps": 1e-4},
            "probabilistic_merge_k8": pm}
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"args": {"images_per_rank": 2500, "pixels": 64, "M": 51,
                                         "orientations": 5000, "photons": 1000.0},
                                "commit": "abc1234", "ranks": [rank, rank]}))
    text = pb.table(path)
    assert ("| `likelihood_k512_beta0.001` | 512 | 0.001 | 2.00 (1.50, 0.75; 0.60) | 2.70 | "
            "2.00 (1.50, 0.75; 0.60) | 2.70 |") in text  # conservative: the k64 case's 1.2 s
    assert "| 8 | 1 | 1500 | 3.00 | 2.00 | 300.00 | 1.20 |" in text  # ms and us
    assert "eps 0.0001" in text and "commit abc1234" in text


def test_time_table_first_crossing_and_cumulative_seconds(tmp_path):
    """Catches the time to solution taken at the last generation instead of the first that
    reaches the threshold, or per-generation seconds instead of the running sum."""
    tt = _module("time_table")
    _run(tmp_path, "r", 0.1, EV)  # generation 1 without CC, generation 2 at 0.881
    d = tmp_path / "r"
    m = json.loads((d / "metrics.json").read_text())
    m["generations"][0]["evaluation"] = {"density_correlation": 0.86}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "config.toml").write_text('[algorithm]\nscore = "euclidean"\ngenerations = 2\n'
                                   'refine_generations = 1\nmatch_resolution_ramp = 6\n'
                                   'n_phase_loops = 10\n')
    line = tt.row(d, 0.85)
    assert "| generation 1: 60 s (CC 0.860) | 120 | 0.881 | 2.2 | abc1234 |" in line
    assert "| not reached | 120 |" in tt.row(d, 0.9)


def test_photon_row_quotes_the_radial_background_range(tmp_path):
    """Catches the radial background's range taken over shells without pixels (their 0) or
    quoted when the estimate was not used (the model fit ran instead)."""
    pt = _module("photon_table")
    _run(tmp_path, "r", 0.1, EV)
    d = tmp_path / "r"
    m = json.loads((d / "metrics.json").read_text())
    m["generations"][-1]["posterior"] = {"background_photons_per_pixel": 0.046}
    m["background_from_data"] = {"mode": "radial", "used": True,
                                 "photons_per_pixel": [0.0, 0.0497, 0.0441, 0.0519],
                                 "error": [0.0, 0.01, 0.004, 0.002], "shell_pixels": [0, 5, 9, 12]}
    (d / "metrics.json").write_text(json.dumps(m))
    assert "(estimated 0.046 photons/pixel on average; 0.044-0.052 over the shells)" in pt.row(d)
    m["background_from_data"]["used"] = False
    (d / "metrics.json").write_text(json.dumps(m))
    assert "(estimated 0.046 photons/pixel) |" in pt.row(d)


def _polar_json(path: Path, seconds: float, within: float | None) -> Path:
    r = {"directions": 7500, "n_psi": 160, "orientations": 1200000, "grid_step_deg": 2.33,
         "polar_points": 21920, "pixels": 16384, "annuli": [[53, 160]],
         "images_all_ranks": 1000, "candidates": 2, "seconds": seconds, "cpu_seconds": seconds,
         "parts": {"slicing": 1.0, "correlation": 2.0, "rescoring": 0.5},
         "limit_seconds": 30.0, "fraction_of_limit": 0.8,
         "limit_parts": {"slicing": 10.0, "gemm": 10.0, "fft": 5.0, "rescoring": 5.0}}
    if within is not None:
        r["agreement"] = {"sub_directions": 60, "sub_orientations": 9600, "images": 200,
                          "photons_per_image": 1e4, "within_one_step": within,
                          "same_orientation": within, "polar_seconds": 30.0,
                          "exhaustive_seconds": 300.0}
    path.write_text(json.dumps({"args": {"images_per_rank": 500, "pixels": 128, "M": 81,
                                         "orientations": 1200000, "agreement_directions": 60,
                                         "agreement_images": 200},
                                "commit": "abc1234", "load_average": [1.0, 1.0, 1.0],
                                "ranks": [{"polar_search": r}, {"polar_search": r}]}))
    return path


def test_polar_target_line_follows_the_json(tmp_path):
    """Catches the issue-15 target verdict not following the measured time and agreement
    (60 s, 99% within one grid step), or an agreement claimed when none was measured."""
    pt = _module("polar_table")
    text = "\n".join(pt.bench_block(_polar_json(tmp_path / "paper.json", 44.4, 1.0)))
    assert "time met (44.4 s wall on the slowest rank), agreement met (100.0%" in text
    text = "\n".join(pt.bench_block(_polar_json(tmp_path / "paper.json", 61.0, 0.98)))
    assert "time not met (61.0 s wall" in text and "agreement not met (98.0%" in text
    text = "\n".join(pt.bench_block(_polar_json(tmp_path / "paper.json", 50.0, None)))
    assert "agreement not measured in this run" in text


def test_peer_side_by_side_first_generation_at_the_peers_error(tmp_path):
    """Catches our time to the peer's accuracy taken at the last generation instead of the
    first at or below the peer's median error, per-generation instead of cumulative
    seconds, or a time quoted when the accuracy was never reached."""
    ps = _module("peer_side_by_side")
    gens = [{"generation": i, "timings": {"a": 10.0},
             "evaluation": {"orientation_error_deg": {"median": med}}}
            for i, med in enumerate([120.0, 30.0, 9.0, 5.0])]
    assert ps.first_at_or_below(gens, 9.5) == (3, 30.0, 9.0)
    assert ps.first_at_or_below(gens, 1.0) is None
