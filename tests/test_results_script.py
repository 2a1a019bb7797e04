"""scripts/results.py: README numbers generated from the metrics a run wrote."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("results", ROOT / "scripts" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _metrics(ev):
    return {"M": 41, "n_images": 2000, "n_ranks": 2,
            "generations": [{"lambda_rel": 0.3, "evaluation": {}},
                            {"lambda_rel": 1e-3, "lcurve": {"criterion": "holdout"},
                             "evaluation": ev}]}


def test_snippet_takes_the_last_generation_and_says_not_reached():
    """The paragraph quotes the last generation's numbers; an FSC that never crossed is
    "not reached (better than X A)" (the README used to call Nyquist "the data's limit")."""
    res = _module()
    ev = {"density_correlation": 0.8612, "fsc_resolution_0p5_angstrom": None,
          "fsc_resolution_0p5_status": "not reached",
          "fsc_resolution_0p5_better_than_angstrom": 6.53,
          "fsc_resolution_0p143_angstrom": 7.04, "fsc_resolution_0p143_status": "crossed",
          "orientation_error_deg": {"median": 0.71, "p90": 1.94}}
    text = res.snippet(_metrics(ev), "make demo", "abc1234")
    assert "density correlation 0.861" in text
    assert "FSC 0.5 not reached (better than 6.5 A)" in text and "FSC 0.143 7.0 A" in text
    assert "median orientation error 0.7 deg (p90 1.9 deg)" in text
    assert "`make demo`" in text and "`abc1234`" in text and "2 generations" in text
    assert "lambda_rel 0.001 (holdout)" in text


def test_update_replaces_only_the_marked_block(tmp_path):
    res = _module()
    doc = tmp_path / "README.md"
    doc.write_text("a\n<!-- results:demo -->\nold 0.871\n<!-- /results:demo -->\nb 0.871\n")
    res.update(doc, "demo", "new")
    assert doc.read_text() == "a\n<!-- results:demo -->\nnew\n<!-- /results:demo -->\nb 0.871\n"
    with pytest.raises(SystemExit, match="no <!-- results:other -->"):
        res.update(doc, "other", "x")
