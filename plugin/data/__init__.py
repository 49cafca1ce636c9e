"""Shipped data: the default calibration and held-out corpora."""
