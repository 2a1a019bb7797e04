"""Orientation stage: slicing the model (type-2 NUFFT), scoring images against slices
(Euclidean GEMM or Poisson likelihood with orientation posteriors), the coarse-to-fine
search and off-grid refinement."""
