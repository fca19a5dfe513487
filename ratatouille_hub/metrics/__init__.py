"""Metric modules shipped with the package so `evaluate.load(<path>)` works offline."""
