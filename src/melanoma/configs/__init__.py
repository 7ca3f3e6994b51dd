"""Hydra config tree of melanoma (a package so Hydra finds it in an installed wheel).

Importing it registers the resolver ``${melanoma_demo_data:NAME}``: the folder of a real demo set
shipped inside the package (``melanoma/demo_data/NAME``), wherever melanoma is installed.
"""

from pathlib import Path

from omegaconf import OmegaConf

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo_data"

OmegaConf.register_new_resolver("melanoma_demo_data", lambda name: str(DEMO_DATA / name), replace=True)
