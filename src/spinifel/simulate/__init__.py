"""Ground-truth single-particle imaging datasets (``spinifel-mpi simulate``).

Modules (imported on demand; importing this package does nothing else):

* :mod:`.structure`  - :class:`~.structure.Structure`, PDB/mmCIF reader, built-in molecule
* :mod:`.formfactors` - IT92 four-Gaussian atomic form factors
* :mod:`.scatter`    - structure factors by type-3 NUFFT (and the direct-sum reference)
* :mod:`.truth`      - ground-truth density and 3D intensity on the reconstruction grid
* :mod:`.dataset`    - the MPI dataset writer (original SpiniFEL/skopi layout)
* :mod:`.presets`    - named detector geometries (`simulate --detector`)
* :mod:`.plots`      - PNG of a few patterns

Detector geometry lives in :mod:`spinifel.geometry.detector`.
"""
