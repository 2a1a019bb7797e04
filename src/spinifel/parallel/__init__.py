"""The parallel layer: the only place in spinifel that imports mpi4py.

:mod:`spinifel.parallel.partition` is pure arithmetic (no MPI) so it can be tested
serially; :mod:`spinifel.parallel.context` owns the communicators.
"""
