"""Configuration: ``defaults.toml`` -> validated, frozen dataclasses.

The shipped ``defaults.toml`` is the single documented source of every key. A run config
overrides a subset; ``--set section.key=value`` overrides are parsed with the key's own
type; ``${VAR}`` in strings expands environment variables. Everything is parsed once in
``main()``; an unknown key is an error naming the closest valid key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from spinifel.errors import ConfigError

_VAR = re.compile(r"\$\{([^}]*)\}")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass(frozen=True)
class DataConfig:
    path: str
    n_images: int
    negative: str
    format: str
    adu_per_photon: float

    def __post_init__(self) -> None:
        _check(self.n_images >= 0, "data.n_images", f"must be >= 0, got {self.n_images}")
        _check(self.negative in ("error", "clip"), "data.negative",
               f"must be 'error' or 'clip', got {self.negative!r}")
        _check(self.format in ("auto", "skopi", "cxi"), "data.format",
               f"must be 'auto', 'skopi' or 'cxi', got {self.format!r}")
        _check(self.adu_per_photon >= 0, "data.adu_per_photon",
               f"must be >= 0 (0 = already photons), got {self.adu_per_photon}")


@dataclass(frozen=True)
class DetectorConfig:
    clip: int
    binning: int

    def __post_init__(self) -> None:
        _check(self.clip >= 0, "detector.clip", f"must be >= 0, got {self.clip}")
        _check(0 <= self.binning <= 4, "detector.binning", f"must be in [0, 4], got {self.binning}")


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str
    nufft_backends: tuple[str, ...]
    precision: str
    threads_per_rank: int
    seed: int
    cuda_aware_mpi: bool
    serial_threads: int = 0

    def __post_init__(self) -> None:
        _check(self.backend in ("auto", "numpy", "cupy"), "runtime.backend",
               f"must be 'auto', 'numpy' or 'cupy', got {self.backend!r}")
        bad = [b for b in self.nufft_backends if b not in ("finufft", "cufinufft")]
        _check(not bad and len(self.nufft_backends) > 0, "runtime.nufft_backends",
               f"must be a non-empty list of 'cufinufft'/'finufft', got {list(self.nufft_backends)}")
        _check(self.precision in ("single", "double"), "runtime.precision",
               f"must be 'single' or 'double', got {self.precision!r}")
        _check(1 <= self.threads_per_rank <= 1024, "runtime.threads_per_rank",
               f"must be in [1, 1024], got {self.threads_per_rank}")
        _check(self.seed >= 0, "runtime.seed", f"must be >= 0, got {self.seed}")
        _check(0 <= self.serial_threads <= 1024, "runtime.serial_threads",
               f"must be in [0, 1024] (0 = auto), got {self.serial_threads}")


@dataclass(frozen=True)
class AlgorithmConfig:
    generations: int
    M: int
    n_orientations: int
    orientation_batch: int
    image_batch: int
    scale_per_image: bool
    matching_mode: str
    match_transform: str
    search: str
    polar_n_psi: int
    polar_candidates: int
    coarse_n_orientations: int
    coarse_resolution: float
    coarse_candidates: int
    coarse_radius: float
    coarse_twins: bool
    coarse_max_fine_slices: int
    match_resolution_start: float
    match_resolution_ramp: int
    refine_rounds: int
    refine_generations: int
    refine_stencil: str
    score: str
    orientations_per_image: int
    posterior_mass: float
    beta_start: float
    beta_end: float
    beta_ramp: int
    fluence: str
    likelihood_floor: float
    background: str
    background_shells: int
    use_true_orientations: bool
    nufft_eps_slicing: float
    nufft_eps_merge: float
    cg_max_iter: int
    cg_tol: float
    lambdas: tuple[float, ...]
    lambda_choice: str
    ac_support_radius: float
    n_phase_loops: int
    n_er: int
    n_hio: int
    hio_beta: float
    n_final_er: int
    shrinkwrap_sigma: float
    shrinkwrap_threshold: float
    orientation_change_tol: float
    density_change_tol: float

    def __post_init__(self) -> None:
        a = "algorithm."
        if self.refine_rounds == -1 and self.score != "auto":  # auto: measured per score
            object.__setattr__(self, "refine_rounds", 3 if self.score == "poisson" else 2)
        _check(1 <= self.generations <= 10000, a + "generations",
               f"must be in [1, 10000], got {self.generations}")
        _check(self.M == 0 or (self.M % 2 == 1 and 9 <= self.M <= 513), a + "M",
               f"must be odd and in [9, 513], or 0 (choose from the data), got {self.M}")
        _check(10 <= self.n_orientations <= 50_000_000, a + "n_orientations",
               f"must be in [10, 5e7], got {self.n_orientations}")
        _check(self.orientation_batch >= 1, a + "orientation_batch",
               f"must be >= 1, got {self.orientation_batch}")
        _check(self.image_batch >= 1, a + "image_batch", f"must be >= 1, got {self.image_batch}")
        _check(self.matching_mode in ("replicated", "distributed"), a + "matching_mode",
               f"must be 'replicated' or 'distributed', got {self.matching_mode!r}")
        _check(self.match_transform in ("none", "sqrt"), a + "match_transform",
               f"must be 'none' or 'sqrt', got {self.match_transform!r}")
        _check(self.search in ("exhaustive", "coarse_to_fine", "polar"), a + "search",
               f"must be 'exhaustive', 'coarse_to_fine' or 'polar', got {self.search!r}")
        _check(self.polar_n_psi == 0 or 4 <= self.polar_n_psi <= self.n_orientations // 2,
               a + "polar_n_psi", "must be 0 (auto) or in [4, n_orientations / 2 = "
               f"{self.n_orientations // 2}], got {self.polar_n_psi}")
        _check(1 <= self.polar_candidates <= 64, a + "polar_candidates",
               f"must be in [1, 64], got {self.polar_candidates}")
        _check(not (self.search == "polar" and self.matching_mode == "distributed"),
               a + "search", "'polar' is not available with matching_mode = 'distributed'; "
               "use matching_mode = 'replicated' (polar slicing is n_psi times cheaper)")
        _check(self.coarse_n_orientations == 0
               or 10 <= self.coarse_n_orientations <= self.n_orientations // 2,
               a + "coarse_n_orientations", "must be 0 (auto) or in [10, n_orientations / 2 = "
               f"{self.n_orientations // 2}], got {self.coarse_n_orientations}")
        _check(0 < self.coarse_resolution <= 1, a + "coarse_resolution",
               f"must be in (0, 1], got {self.coarse_resolution}")
        _check(self.coarse_candidates >= 1, a + "coarse_candidates",
               f"must be >= 1, got {self.coarse_candidates}")
        n_coarse = self.coarse_n_orientations or max(10, self.n_orientations // 8)
        _check(self.coarse_candidates <= n_coarse, a + "coarse_candidates",
               f"must be <= the coarse grid size {n_coarse}, got {self.coarse_candidates}")
        _check(0.5 <= self.coarse_radius <= 4, a + "coarse_radius",
               f"must be in [0.5, 4] (coarse grid spacings), got {self.coarse_radius}")
        _check(self.coarse_max_fine_slices >= 0, a + "coarse_max_fine_slices",
               f"must be >= 0 (0 = no limit), got {self.coarse_max_fine_slices}")
        _check(not (self.search == "coarse_to_fine" and self.matching_mode == "distributed"),
               a + "search", "'coarse_to_fine' is not available with matching_mode = "
               "'distributed' (the ring passes whole-grid batches); use 'exhaustive' or "
               "matching_mode = 'replicated'")
        _check(0 < self.match_resolution_start <= 1, a + "match_resolution_start",
               f"must be in (0, 1], got {self.match_resolution_start}")
        _check(self.match_resolution_ramp >= 1, a + "match_resolution_ramp",
               f"must be >= 1, got {self.match_resolution_ramp}")
        _check(0 <= self.refine_rounds <= 8 or (self.refine_rounds == -1 and self.score == "auto"),
               a + "refine_rounds",
               f"must be in [0, 8] or -1 (auto), got {self.refine_rounds}")
        _check(self.refine_stencil in ("axes", "cube"), a + "refine_stencil",
               f"must be 'axes' or 'cube', got {self.refine_stencil!r}")
        _check(self.refine_generations >= 0, a + "refine_generations",
               f"must be >= 0, got {self.refine_generations}")
        self._check_poisson()
        for k in ("nufft_eps_slicing", "nufft_eps_merge"):
            v = getattr(self, k)
            _check(1e-15 <= v <= 1e-1, a + k, f"must be in [1e-15, 0.1], got {v}")
        _check(self.cg_max_iter >= 1, a + "cg_max_iter", f"must be >= 1, got {self.cg_max_iter}")
        _check(0 < self.cg_tol < 1, a + "cg_tol", f"must be in (0, 1), got {self.cg_tol}")
        _check(len(self.lambdas) >= 1 and all(v > 0 and math.isfinite(v) for v in self.lambdas),
               a + "lambdas", f"must be a non-empty list of positive numbers, got {list(self.lambdas)}")
        _check(len(set(self.lambdas)) == len(self.lambdas), a + "lambdas",
               f"must not repeat values, got {list(self.lambdas)}")
        _check(self.lambda_choice in ("holdout", "lcurve"), a + "lambda_choice",
               f"must be \"holdout\" or \"lcurve\", got {self.lambda_choice!r}")
        _check(0 < self.ac_support_radius <= 2.0, a + "ac_support_radius",
               f"must be in (0, 2], got {self.ac_support_radius}")
        for k in ("n_phase_loops", "n_er", "n_hio", "n_final_er"):
            _check(getattr(self, k) >= 0, a + k, f"must be >= 0, got {getattr(self, k)}")
        _check(0 < self.hio_beta <= 1.5, a + "hio_beta", f"must be in (0, 1.5], got {self.hio_beta}")
        _check(self.shrinkwrap_sigma > 0, a + "shrinkwrap_sigma",
               f"must be > 0, got {self.shrinkwrap_sigma}")
        _check(0 < self.shrinkwrap_threshold < 1, a + "shrinkwrap_threshold",
               f"must be in (0, 1), got {self.shrinkwrap_threshold}")
        for k in ("orientation_change_tol", "density_change_tol"):
            _check(0 <= getattr(self, k) < 1, a + k, f"must be in [0, 1), got {getattr(self, k)}")


    def _check_poisson(self) -> None:
        a = "algorithm."
        _check(self.score in ("euclidean", "poisson", "auto"), a + "score",
               f"must be 'euclidean', 'poisson' or 'auto', got {self.score!r}")
        _check(1 <= self.orientations_per_image <= 4096, a + "orientations_per_image",
               f"must be in [1, 4096], got {self.orientations_per_image}")
        _check(0 < self.posterior_mass <= 1, a + "posterior_mass",
               f"must be in (0, 1], got {self.posterior_mass}")
        _check(0 < self.beta_start <= self.beta_end, a + "beta_start",
               f"must be in (0, beta_end = {self.beta_end}], got {self.beta_start}")
        _check(0 < self.beta_end <= 100, a + "beta_end", f"must be in (0, 100], got {self.beta_end}")
        _check(self.beta_ramp >= 0, a + "beta_ramp", f"must be >= 0 (0 = auto), got {self.beta_ramp}")
        _check(self.fluence in ("emc", "fitted"), a + "fluence",
               f"must be 'emc' or 'fitted', got {self.fluence!r}")
        _check(0 < self.likelihood_floor < 1, a + "likelihood_floor",
               f"must be in (0, 1), got {self.likelihood_floor}")
        _check(self.background in ("none", "flat", "radial"), a + "background",
               f"must be 'none', 'flat' or 'radial', got {self.background!r}")
        _check(self.background_shells >= 1, a + "background_shells",
               f"must be >= 1, got {self.background_shells}")
        if self.score == "poisson":  # ("auto" resolves to it only where these hold)
            # The coarse-to-fine search ranks orientations by the Euclidean distance; its
            # likelihood version is not implemented (local refinement is: the likelihood).
            _check(self.search != "coarse_to_fine", a + "search",
                   "'coarse_to_fine' is not available with algorithm.score = 'poisson'; "
                   "use 'exhaustive' or 'polar'")
            _check(self.search != "polar" or self.background == "none", a + "background",
                   f"'{self.background}' is not available with algorithm.search = 'polar' "
                   "(no background estimate from polar slices yet); use 'none' or "
                   "algorithm.search = 'exhaustive'")
            _check(self.matching_mode == "replicated", a + "matching_mode",
                   "'distributed' is not available with algorithm.score = 'poisson'; use "
                   "'replicated'")


def poisson_supported(a: AlgorithmConfig) -> str:
    """Why the Poisson score cannot run with the other ``algorithm`` settings ("" if it can):
    what ``algorithm.score = "auto"`` checks before choosing it for photon counts."""
    if a.search == "coarse_to_fine":
        return "algorithm.search = 'coarse_to_fine'"
    if a.matching_mode != "replicated":
        return f"algorithm.matching_mode = '{a.matching_mode}'"
    if a.search == "polar" and a.background != "none":
        return f"algorithm.search = 'polar' with algorithm.background = '{a.background}'"
    return ""


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    write_every: int
    mrc: bool
    progress_png: bool

    def __post_init__(self) -> None:
        _check(self.dir != "", "output.dir", "must not be empty")
        _check(self.write_every >= 1, "output.write_every", f"must be >= 1, got {self.write_every}")


@dataclass(frozen=True)
class EvaluationConfig:
    enabled: bool
    min_correlation: float

    def __post_init__(self) -> None:
        _check(0 <= self.min_correlation <= 1, "evaluation.min_correlation",
               f"must be in [0, 1], got {self.min_correlation}")


@dataclass(frozen=True)
class ValidationConfig:
    half_sets: str
    prtf_runs: int
    prtf_average: bool

    def __post_init__(self) -> None:
        _check(self.half_sets in ("off", "shared", "independent"), "validation.half_sets",
               f"must be 'off', 'shared' or 'independent', got {self.half_sets!r}")
        _check(self.prtf_runs == 0 or 2 <= self.prtf_runs <= 1000, "validation.prtf_runs",
               f"must be 0 (off) or in [2, 1000], got {self.prtf_runs}")


@dataclass(frozen=True)
class Config:
    """The fully resolved configuration of a run (one section per dataclass)."""

    data: DataConfig
    detector: DetectorConfig
    runtime: RuntimeConfig
    algorithm: AlgorithmConfig
    output: OutputConfig
    evaluation: EvaluationConfig
    validation: ValidationConfig

    def to_dict(self) -> dict:
        d = asdict(self)
        for sec in d.values():
            for k, v in sec.items():
                if isinstance(v, tuple):
                    sec[k] = list(v)
        return d

    def to_toml(self) -> str:
        """The resolved configuration as TOML text (stored in results and checkpoints)."""
        return dumps_toml(self.to_dict())


_SECTIONS = {f.name: f.type for f in fields(Config)}
_SECTION_CLASSES = {
    "data": DataConfig, "detector": DetectorConfig, "runtime": RuntimeConfig,
    "algorithm": AlgorithmConfig, "output": OutputConfig, "evaluation": EvaluationConfig,
    "validation": ValidationConfig,
}


def defaults_text() -> str:
    """The shipped, commented ``defaults.toml``."""
    return resources.files("spinifel").joinpath("defaults.toml").read_text(encoding="utf-8")


def default_dict() -> dict:
    """The defaults as a nested dict."""
    return tomllib.loads(defaults_text())


def _closest(key: str, options: list[str]) -> str:
    m = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else f" (valid: {', '.join(sorted(options))})"


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default`` or raise ConfigError naming ``key``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected a boolean (true/false), got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
            return v
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return _expand(key, value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        proto = default[0] if default else value[0] if value else ""
        return [_coerce(f"{key}[{i}]", v, proto) for i, v in enumerate(value)]
    raise ConfigError(f"config key '{key}': unsupported default type {type(default).__name__}")


def _expand(key: str, text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if not name or name not in os.environ:
            raise ConfigError(f"config key '{key}': environment variable '{name}' is not set")
        return os.environ[name]

    return _VAR.sub(sub, text)


def _merge(base: dict, override: Mapping, where: str) -> None:
    for sec, values in override.items():
        if sec not in base:
            raise ConfigError(f"unknown config section '{sec}' in {where}{_closest(sec, list(base))}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section '{sec}' in {where} must be a table, got {values!r}")
        for k, v in values.items():
            if k not in base[sec]:
                raise ConfigError(
                    f"unknown config key '{sec}.{k}' in {where}{_closest(k, list(base[sec]))}")
            base[sec][k] = _coerce(f"{sec}.{k}", v, base[sec][k])


def parse_override(text: str, defaults: dict) -> tuple[str, str, Any]:
    """Parse one ``section.key=value`` override with the key's own type.

    The value is read as a TOML literal when possible (numbers, booleans, lists, quoted
    strings); for string keys anything else is taken verbatim, so values may contain ``=``.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    name, raw = text.split("=", 1)
    name = name.strip()
    if name.count(".") != 1:
        raise ConfigError(f"--set {text!r}: expected section.key=value, got key {name!r}")
    sec, key = name.split(".")
    if sec not in defaults:
        raise ConfigError(f"--set: unknown config section '{sec}'{_closest(sec, list(defaults))}")
    if key not in defaults[sec]:
        raise ConfigError(f"--set: unknown config key '{sec}.{key}'{_closest(key, list(defaults[sec]))}")
    default = defaults[sec][key]
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        if isinstance(default, str):
            value = raw
        else:
            raise ConfigError(f"--set {name}: cannot parse {raw!r} as a {type(default).__name__}") from None
    if isinstance(default, str) and not isinstance(value, str):
        value = raw.strip()
    return sec, key, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = (),
                extra: Mapping | None = None) -> Config:
    """Build the resolved :class:`Config`.

    Parameters
    ----------
    path : path-like or None
        A TOML run config; relative ``data.path`` / ``output.dir`` are resolved against
        its directory. ``None`` uses the defaults only.
    overrides : list of str
        ``section.key=value`` strings applied after the file.
    extra : mapping, optional
        Nested dict applied after the file and before ``overrides`` (used by ``demo``).
    """
    merged = default_dict()
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            user = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p}: not valid TOML ({e})") from None
        _merge(merged, user, str(p))
        base_dir = p.resolve().parent
        for sec, key in (("data", "path"), ("output", "dir")):
            if sec in user and key in user[sec] and merged[sec][key]:
                q = Path(merged[sec][key])
                merged[sec][key] = str(q if q.is_absolute() else base_dir / q)
    if extra:
        _merge(merged, extra, "built-in settings")
    defaults = default_dict()
    for text in overrides:
        sec, key, value = parse_override(text, defaults)
        _merge(merged, {sec: {key: value}}, "--set")
    return build_config(merged)


def build_config(d: Mapping) -> Config:
    """Validate a complete nested dict (all keys present) into a :class:`Config`."""
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        values = dict(d[name])
        for f in fields(cls):
            if isinstance(values.get(f.name), list):
                values[f.name] = tuple(values[f.name])
        sections[name] = cls(**values)
    return Config(**sections)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps_toml(d: Mapping) -> str:
    """Write a two-level dict of scalars and lists as TOML (enough for our config)."""
    lines = []
    for sec, values in d.items():
        lines.append(f"[{sec}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
