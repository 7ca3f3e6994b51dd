"""Shared fixtures: a private cache folder, small generated datasets, composed configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from melanoma.synthetic import generate_dataset

TINY = ["model.name=test_efficientnet", "model.pretrained=false", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=0", "trainer.epochs=2", "trainer.deterministic=true"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the demo set and anything else cached out of the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MELANOMA_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic set in the kaggle layout: 150 train and 20 test JPEGs of 48 px."""
    return generate_dataset(tmp_path_factory.mktemp("tiny") / "set", n_train=150, n_test=20, size=48, seed=7)


def make_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose the real packaged config with overrides, as the CLI would."""
    with initialize_config_module(config_module="melanoma.configs", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])
