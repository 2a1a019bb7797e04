"""Geometry: quaternions, orientation grids and detector pixel positions."""
