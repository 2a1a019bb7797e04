"""Config: defaults, unknown keys, types, --set, ${VAR} expansion."""

import re
from dataclasses import fields

import pytest
import tomllib

from spinifel.config import (
    Config,
    build_config,
    default_dict,
    defaults_text,
    load_config,
    parse_override,
)
from spinifel.errors import ConfigError


def test_defaults_load_and_every_key_documented():
    cfg = load_config()
    assert cfg.algorithm.M % 2 == 1
    d = default_dict()
    # every dataclass field has a default and vice versa
    for f in fields(Config):
        section_fields = {g.name for g in fields(f.type if isinstance(f.type, type) else type(getattr(cfg, f.name)))}
        assert section_fields == set(d[f.name]), f.name
    # every key line in defaults.toml is preceded by a comment line
    lines = defaults_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-zA-Z_]+ = ", line):
            j = i - 1
            while j >= 0 and re.match(r"^[a-zA-Z_]+ = ", lines[j]):
                j -= 1
            assert lines[j].startswith("#"), f"undocumented key: {line}"


def test_toml_round_trip():
    cfg = load_config(overrides=["algorithm.lambdas=[0.5, 2]", "data.path=x.h5"])
    assert build_config(tomllib.loads(cfg.to_toml())) == cfg


def test_unknown_key_names_closest(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[algorithm]\ngeneratons = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm.generatons'.*did you mean 'generations'"):
        load_config(p)
    p.write_text("[algoritm]\nM = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'algoritm'.*'algorithm'"):
        load_config(p)


def test_bad_types_and_ranges(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[algorithm]\nM = \"big\"\n")
    with pytest.raises(ConfigError, match=r"'algorithm.M': expected an integer, got 'big'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"'algorithm.M': must be odd"):
        load_config(overrides=["algorithm.M=40"])
    # M = 0 means "choose from the data" (geometry/box.py); 1 and 7 stay refused.
    assert load_config(overrides=["algorithm.M=0"]).algorithm.M == 0
    for bad in ("1", "7", "-1"):
        with pytest.raises(ConfigError, match=r"'algorithm.M': must be odd.*or 0"):
            load_config(overrides=[f"algorithm.M={bad}"])
    with pytest.raises(ConfigError, match=r"'algorithm.n_orientations'"):
        load_config(overrides=["algorithm.n_orientations=1"])
    with pytest.raises(ConfigError, match=r"expected a boolean"):
        load_config(overrides=["output.mrc=1"])
    with pytest.raises(ConfigError, match=r"'algorithm.lambdas'"):
        load_config(overrides=["algorithm.lambdas=[1, -1]"])
    with pytest.raises(ConfigError, match=r"'runtime.serial_threads': must be in \[0, 1024\]"):
        load_config(overrides=["runtime.serial_threads=-1"])
    assert load_config(overrides=["runtime.serial_threads=4"]).runtime.serial_threads == 4
    p.write_text("[algorithm\n")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "missing.toml")


def test_set_overrides_parse_with_key_type():
    cfg = load_config(overrides=["algorithm.generations=7", "algorithm.cg_tol=1e-3",
                                 "algorithm.scale_per_image=true", "data.path=/a/b=c.h5",
                                 "runtime.nufft_backends=[\"finufft\"]"])
    assert cfg.algorithm.generations == 7 and isinstance(cfg.algorithm.generations, int)
    assert cfg.algorithm.cg_tol == 1e-3
    assert cfg.algorithm.scale_per_image is True
    assert cfg.data.path == "/a/b=c.h5"
    assert cfg.runtime.nufft_backends == ("finufft",)
    # an integer for a float key is accepted and converted
    assert load_config(overrides=["algorithm.hio_beta=1"]).algorithm.hio_beta == 1.0
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("generations", default_dict())
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(overrides=["algorithm.generations=ten"])


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("SPINIFEL_TEST_DIR", "/scratch/run1")
    p = tmp_path / "c.toml"
    p.write_text("[output]\ndir = \"${SPINIFEL_TEST_DIR}/out\"\n")
    assert load_config(p).output.dir == "/scratch/run1/out"
    monkeypatch.delenv("SPINIFEL_TEST_DIR")
    with pytest.raises(ConfigError, match=r"'output.dir': environment variable 'SPINIFEL_TEST_DIR' is not set"):
        load_config(p)


def test_relative_paths_follow_config_file(tmp_path):
    p = tmp_path / "sub" / "c.toml"
    p.parent.mkdir()
    p.write_text("[data]\npath = \"data.h5\"\n")
    assert load_config(p).data.path == str(tmp_path / "sub" / "data.h5")


def test_config_is_frozen():
    cfg = load_config()
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        cfg.algorithm.M = 3


@pytest.mark.parametrize("name", ["quickstart.toml", "2cex.toml", "poisson.toml", "beamline.toml"])
def test_example_configs_validate(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / name
    cfg = load_config(path)
    assert cfg.algorithm.M % 2 == 1
    assert Path(cfg.data.path).is_absolute()


def test_config_reference_doc_is_current():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    body = doc.split("```toml\n", 1)[1].rsplit("```", 1)[0]
    assert body == defaults_text(), "docs/config.md is stale: regenerate it from defaults.toml"


def test_lambda_choice_must_be_holdout_or_lcurve():
    """A mistyped algorithm.lambda_choice is one ConfigError naming the key."""
    assert load_config(None, (), {}).algorithm.lambda_choice == "holdout"
    assert load_config(None, (), {"algorithm": {"lambda_choice": "lcurve"}}).algorithm.lambda_choice == "lcurve"
    with pytest.raises(ConfigError, match="algorithm.lambda_choice.*'gcv'"):
        load_config(None, (), {"algorithm": {"lambda_choice": "gcv"}})
