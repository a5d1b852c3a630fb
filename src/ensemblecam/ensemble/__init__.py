"""Ensembles of thresholded CAMs: operators, grids and the exact search."""
