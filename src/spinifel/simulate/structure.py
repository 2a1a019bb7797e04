"""Atomic structures to simulate: PDB/mmCIF files and a seeded built-in molecule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinifel.errors import DatasetError

# Heavy-atom element shares of an average protein (C : N : O : S, about 63 : 17 : 19 : 1).
_SIDE_ELEMENTS = np.array(["C", "N", "O", "S"])
_SIDE_WEIGHTS = np.array([0.78, 0.09, 0.11, 0.02])  # side chains; backbone adds N, C, O
_CA_STEP = 3.8  # angstrom between consecutive C-alpha atoms
_CA_CLASH = 4.0  # closest approach of non-consecutive C-alpha atoms
_VOLUME_PER_ATOM = 18.0  # angstrom^3 per heavy atom in a packed protein


@dataclass(frozen=True)
class Structure:
    """Atoms of one molecule.

    Attributes
    ----------
    name : str
        Label written to the dataset (file stem or ``builtin-seed<N>``).
    xyz : ndarray, shape (n_atoms, 3), float64
        Atom positions in angstrom, centred on the centre of mass.
    elements : ndarray, shape (n_atoms,), str
        Element symbols (``"C"``, ``"Zn"`` ...).
    """

    name: str
    xyz: np.ndarray
    elements: np.ndarray

    def __post_init__(self) -> None:
        xyz = np.asarray(self.xyz, dtype=np.float64)
        el = np.asarray(self.elements).astype(str)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"Structure {self.name!r}: xyz must have shape (n_atoms, 3), "
                             f"got {xyz.shape}")
        if el.shape != (xyz.shape[0],):
            raise ValueError(f"Structure {self.name!r}: elements must have shape "
                             f"({xyz.shape[0]},), got {el.shape}")
        if not np.all(np.isfinite(xyz)):
            raise ValueError(f"Structure {self.name!r}: non-finite atom coordinates")
        object.__setattr__(self, "xyz", xyz)
        object.__setattr__(self, "elements", el)

    @classmethod
    def from_atoms(cls, name: str, xyz: np.ndarray, elements: np.ndarray) -> "Structure":
        """Build a structure, moving the centre of mass (atomic weights) to the origin."""
        xyz = np.asarray(xyz, dtype=np.float64)
        el = np.asarray(elements).astype(str)
        return cls(name=name, xyz=xyz - centre_of_mass(xyz, el), elements=el)

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.xyz.shape[0])

    def element_groups(self) -> dict[str, np.ndarray]:
        """Indices of the atoms of each element, in sorted symbol order."""
        return {e: np.flatnonzero(self.elements == e) for e in np.unique(self.elements)}

    def max_extent(self) -> float:
        """Largest distance between two atoms in angstrom (the molecule's size)."""
        from scipy.spatial import ConvexHull
        from scipy.spatial.distance import pdist

        pts = self.xyz
        if pts.shape[0] > 8:
            try:
                pts = pts[ConvexHull(pts).vertices]  # diameter is attained on the hull
            except Exception:  # degenerate (flat) sets: fall back to all points
                pass
        return float(pdist(pts).max()) if pts.shape[0] > 1 else 0.0


def centre_of_mass(xyz: np.ndarray, elements: np.ndarray) -> np.ndarray:
    """Centre of mass in angstrom of atoms ``xyz (n, 3)`` with symbols ``elements (n,)``."""
    import gemmi

    w = np.array([gemmi.Element(str(e)).weight for e in elements], dtype=np.float64)
    if xyz.shape[0] == 0 or w.sum() <= 0:
        return np.zeros(3)
    return (w[:, None] * xyz).sum(axis=0) / w.sum()


def load_structure(path: str | Path, *, keep_waters: bool = False,
                   keep_hydrogens: bool = False) -> Structure:
    """Read the first model of a PDB or mmCIF file.

    Only the first alternative conformation of each atom is kept; waters and hydrogens
    (including deuterium) are dropped unless asked for.

    Parameters
    ----------
    path : str or Path
        ``.pdb``, ``.ent``, ``.cif`` or ``.mmcif`` file (gzipped is fine).
    keep_waters, keep_hydrogens : bool
        Keep water molecules / hydrogen atoms.

    Returns
    -------
    Structure
        Named after the file stem, centred on its centre of mass.

    Raises
    ------
    DatasetError
        If the file cannot be read, holds no atoms, or has an atom of unknown element.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "structure file not found")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        raise DatasetError(path, None, f"cannot read as PDB/mmCIF: {exc}") from exc
    if len(st) == 0:
        raise DatasetError(path, None, "expected at least one model, found none")
    st.remove_alternative_conformations()
    if not keep_hydrogens:
        st.remove_hydrogens()
    if not keep_waters:
        st.remove_waters()
    xyz, elements = [], []
    for chain in st[0]:
        for residue in chain:
            for atom in residue:
                if atom.element.atomic_number == 0:
                    raise DatasetError(path, None, f"atom {atom.name!r} of residue "
                                       f"{residue.name} {residue.seqid} has unknown element "
                                       f"{atom.element.name!r}; expected a chemical element")
                xyz.append(atom.pos.tolist())
                elements.append(atom.element.name)
    if not xyz:
        raise DatasetError(path, None, "expected atoms (after removing waters and hydrogens), "
                           "found none")
    return Structure.from_atoms(path.name.split(".")[0], np.array(xyz), np.array(elements))


def _inside_shape(p: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Points ``(..., 3)`` inside an egg-shaped body: an ellipsoid fattened towards ``+x``.

    The half-widths along y and z grow linearly with x, which makes the envelope itself
    non-centrosymmetric.
    """
    a, b, c = axes
    taper = 1.0 + 0.35 * np.clip(p[..., 0] / a, -1.0, 1.0)
    return (p[..., 0] / a) ** 2 + (p[..., 1] / (b * taper)) ** 2 + \
        (p[..., 2] / (c * taper)) ** 2 <= 1.0


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def builtin_molecule(seed: int = 0, n_atoms: int = 2000) -> Structure:
    """A seeded, asymmetric, protein-like molecule.

    A C-alpha chain is grown as a self-avoiding random walk with 3.8 angstrom steps inside an
    egg-shaped envelope sized for protein packing (about 18 angstrom^3 per heavy atom, so
    2000 atoms span about 55 angstrom). Each residue carries the backbone atoms N, C, O
    about 1.4 angstrom from its C-alpha and 0-5 side-chain atoms on a short walk pointing
    away from the chain, with elements C/N/O/S in protein-like proportions.

    Parameters
    ----------
    seed : int
        Seed of ``numpy.random.default_rng``; the molecule is a deterministic function of
        ``(seed, n_atoms)``.
    n_atoms : int
        Exact number of atoms, >= 4.

    Returns
    -------
    Structure
        Named ``builtin-seed<seed>``, centred on its centre of mass.
    """
    if n_atoms < 4:
        raise ValueError(f"builtin_molecule needs n_atoms >= 4, got {n_atoms}")
    rng = np.random.default_rng(seed)
    # Envelope: volume n_atoms * 18 A^3 split over semi-axes in ratio 1.35 : 1 : 0.85.
    ratio = np.array([1.35, 1.0, 0.85])
    scale = (n_atoms * _VOLUME_PER_ATOM / (4.0 / 3.0 * np.pi * ratio.prod())) ** (1.0 / 3.0)
    axes = ratio * scale

    n_res_max = n_atoms  # never more residues than atoms
    ca = np.empty((n_res_max, 3))
    ca[0] = 0.0
    xyz: list[np.ndarray] = []
    elements: list[str] = []
    count = 0
    i = 0
    while count < n_atoms:
        if i > 0:
            # Propose steps biased to continue forward (protein chains are locally stiff);
            # accept the first inside the envelope that clashes with no earlier C-alpha.
            prev_dir = ca[i - 1] - ca[i - 2] if i > 1 else _random_unit(rng, 1)[0]
            prev_dir = prev_dir / np.linalg.norm(prev_dir)
            cand = _random_unit(rng, 64) + 0.5 * prev_dir
            cand = ca[i - 1] + _CA_STEP * cand / np.linalg.norm(cand, axis=1, keepdims=True)
            ok = _inside_shape(cand, axes)
            if i > 2:
                d = np.linalg.norm(cand[:, None, :] - ca[None, : i - 2, :], axis=-1)
                ok &= d.min(axis=1) >= _CA_CLASH
            good = np.flatnonzero(ok)
            if good.size:
                ca[i] = cand[good[0]]
            else:  # trapped: jump to a random free spot inside the envelope (chain break)
                ca[i] = _free_spot(rng, ca[:i], axes)
        # Residue atoms: CA, then N, C, O of the backbone, then side-chain atoms.
        res_atoms = [(ca[i], "C")]
        for el in ("N", "C", "O"):
            res_atoms.append((ca[i] + 1.45 * _random_unit(rng, 1)[0], el))
        pos = ca[i].copy()
        outward = _random_unit(rng, 1)[0]
        for _ in range(int(rng.integers(0, 6))):
            step = outward + 0.6 * _random_unit(rng, 1)[0]
            pos = pos + 1.5 * step / np.linalg.norm(step)
            res_atoms.append((pos.copy(), str(rng.choice(_SIDE_ELEMENTS, p=_SIDE_WEIGHTS))))
        for p, el in res_atoms[: n_atoms - count]:
            xyz.append(p)
            elements.append(el)
        count = len(xyz)
        i += 1
    return Structure.from_atoms(f"builtin-seed{seed}", np.array(xyz), np.array(elements))


def _free_spot(rng: np.random.Generator, ca: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """A random point inside the envelope, farthest from existing C-alphas among a few tries."""
    cand = rng.uniform(-1.0, 1.0, (256, 3)) * axes * 1.35
    cand = cand[_inside_shape(cand, axes)]
    if cand.shape[0] == 0:
        return np.zeros(3)
    d = np.linalg.norm(cand[:, None, :] - ca[None, :, :], axis=-1).min(axis=1)
    return cand[int(np.argmax(d))]
