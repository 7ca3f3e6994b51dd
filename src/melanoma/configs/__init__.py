"""Hydra config tree of melanoma (a package so Hydra finds it in an installed wheel).

One group per core module it feeds (``data`` -> ``data.py``, ``model`` -> ``models.py``, ...); the
entry points in :mod:`melanoma.cli` compose it. The resolvers its files use (``${melanoma_demo_data:NAME}``,
``${melanoma_run_dir:...}``) are registered by :mod:`melanoma.cli`.
"""
