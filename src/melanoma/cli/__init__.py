"""The console entry points: the only modules that read a Hydra config.

Each module composes its config from :mod:`melanoma.configs`, checks it, unpacks it into plain
arguments and calls the core (``melanoma.data``, ``melanoma.crossval``, ``melanoma.inference``, ...)
or :mod:`melanoma.reporting`. Importing this package registers the resolvers the config tree uses.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from melanoma.data import DEMO_DATA


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ${melanoma_demo_data:NAME}: a real demo set shipped inside the package, wherever it is installed.
OmegaConf.register_new_resolver("melanoma_demo_data", lambda name: str(DEMO_DATA / name), replace=True)
# hydra.run.dir is the resumed run's directory when resume= is set, else a new dated one. Under
# torchrun only rank 0 writes Hydra's .hydra/ folder, and other ranks log to train.rank{N}.log.
OmegaConf.register_new_resolver("melanoma_run_dir", lambda resume, new: resume or new, replace=True)
OmegaConf.register_new_resolver("melanoma_rank0_only", lambda value: value if _env_rank() == 0 else None,
                                replace=True)
OmegaConf.register_new_resolver("melanoma_rank_suffix", lambda: f".rank{_env_rank()}" if _env_rank() else "",
                                replace=True)
