"""Benchmark tool (``spinifel-mpi bench``): stage timings on a synthetic problem and the
comparison of matching with independent nearest-neighbour libraries. Not a pipeline stage."""
