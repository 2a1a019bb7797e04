"""The benchmark runs and reports every stage next to its measured limit (no timing asserted)."""

import json

from spinifel.cli import main


def test_bench_small_case(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--images-per-rank", "40", "--pixels", "16", "--M", "15",
                 "--orientations", "200", "--json", str(out)]) == 0
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
