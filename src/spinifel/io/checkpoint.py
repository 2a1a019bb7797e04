"""Checkpoints: everything needed to continue a run, in HDF5 (never pickle).

Rank 0 writes ``OUT/checkpoint.h5`` atomically after every generation. Loading it runs no
code: it holds only numeric arrays and text. There is no RNG state to store: every random
choice derives from ``runtime.seed`` and the generation number (see pipeline/solver.py).

A checkpoint carries a fingerprint of the dataset's shape and identity (resolved path,
file size and a digest of its first, middle and last image: :func:`dataset_identity`) and
of the config's ``[algorithm]`` (except ``generations``, which may be raised to continue a
finished run), ``[detector]`` and ``[runtime].seed`` / precision settings; a run with a
different fingerprint refuses to resume from it. The number of ranks may differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from spinifel.errors import CheckpointError
from spinifel.io.output import atomic_write

NAME = "checkpoint.h5"
_ARRAYS = ("merged_ac", "phased_ac", "density", "support", "orientations", "match_index",
           # validation.half_sets: the two half maps' chains, stacked (2, M, M, M)
           "half_merged_ac", "half_phased_ac", "half_density", "half_support")


def dataset_identity(path: str | Path, n_images: int, format: str = "auto") -> str:
    """Identity of the images a run reads: path, size and a digest of three images.

    Parameters
    ----------
    path : str or Path
        The dataset file (``data.path``).
    n_images : int
        Images the run uses (rows ``0 .. n_images - 1`` of the image stack), >= 1.
    format : str
        ``data.format``.

    Returns
    -------
    str
        SHA-256 hex digest of the resolved path, the file size in bytes and the raw values
        (dtype and bytes) of images ``0``, ``n_images // 2`` and ``n_images - 1``. Two files
        of the same shape give different identities unless those three images, the size
        and the path all agree. Reads three images: cheap on any rank.
    """
    from spinifel.io.dataset import inspect_dataset

    p = Path(path).resolve()
    info = inspect_dataset(p, format)
    h = hashlib.sha256()
    h.update(str(p).encode())
    h.update(str(p.stat().st_size).encode())
    with h5py.File(p, "r") as f:
        d = f[info.images_dataset]
        for row in sorted({0, n_images // 2, max(n_images - 1, 0)}):
            img = np.ascontiguousarray(d[row])
            h.update(img.dtype.str.encode())
            h.update(img.tobytes())
    return h.hexdigest()


def fingerprint(cfg: Any, n_images: int, detector_shape: tuple,
                dataset_id: str | None = None) -> str:
    """SHA-256 of what must match for a checkpoint to be valid for this run.

    ``dataset_id``: :func:`dataset_identity` of the run's dataset (None: the dataset is
    identified by its shape only, as before; the pipeline passes it).
    """
    d = cfg.to_dict()
    # The number of generations may grow on resume: "run 10 more" is a normal request.
    algorithm = {k: v for k, v in d["algorithm"].items() if k != "generations"}
    key = {"algorithm": algorithm, "detector": d["detector"],
           "seed": d["runtime"]["seed"], "precision": d["runtime"]["precision"],
           "n_images": int(n_images), "detector_shape": [int(x) for x in detector_shape]}
    if dataset_id is not None:
        key["dataset"] = dataset_id
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_checkpoint(out_dir: str | Path, *, generation: int, fingerprint: str, config_toml: str,
                     **arrays: np.ndarray | None) -> Path:
    """Write ``OUT/checkpoint.h5`` (rank 0). ``arrays``: the names in ``_ARRAYS`` (None = absent)."""
    unknown = set(arrays) - set(_ARRAYS)
    if unknown:
        raise ValueError(f"unknown checkpoint arrays: {sorted(unknown)}")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["generation"] = int(generation)
            f.attrs["fingerprint"] = fingerprint
            f.attrs["config"] = config_toml
            for name, a in arrays.items():
                if a is not None:
                    f.create_dataset(name, data=np.asarray(a))

    return atomic_write(Path(out_dir) / NAME, write)


def read_checkpoint(out_dir: str | Path, expected_fingerprint: str) -> dict:
    """Read and validate ``OUT/checkpoint.h5``; CheckpointError with one line otherwise."""
    path = Path(out_dir) / NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with h5py.File(path, "r") as f:
            fp = f.attrs.get("fingerprint")
            if isinstance(fp, bytes):
                fp = fp.decode()
            if fp != expected_fingerprint:
                raise CheckpointError(
                    f"{path}: written for another dataset (file, size or images) or other "
                    "[algorithm]/[detector]/seed settings; refusing to resume (start a new run "
                    "or restore that dataset and config)")
            out = {"generation": int(f.attrs["generation"])}
            for name in _ARRAYS:
                out[name] = f[name][()] if name in f else None
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint (missing {e})") from None
    return out
