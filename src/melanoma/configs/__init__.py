"""Hydra config tree of melanoma (a package so Hydra finds it in an installed wheel)."""
