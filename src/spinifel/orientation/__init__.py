"""Orientation determination: scoring images against model slices and orientation posteriors."""
