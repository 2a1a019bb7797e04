"""Validation without ground truth: half-set FSC, PRTF and the live progress plot.

Everything here is host-side numpy on rank 0's arrays (or on any rank's, for the split);
nothing imports MPI. The pipeline decides which rank computes what.
"""
