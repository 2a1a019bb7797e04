"""spinifel-mpi: M-TIP reconstruction of single-particle X-ray diffraction data over MPI.

Importing the package has no side effects: no MPI initialisation, no argument parsing,
no logging configuration and no file creation. The command-line entry point is
:func:`spinifel.cli.main`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
