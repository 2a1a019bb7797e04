"""Orientation stage: slicing the model (type-2 NUFFT), matching images to slices (GEMM),
the coarse-to-fine search and off-grid refinement."""
