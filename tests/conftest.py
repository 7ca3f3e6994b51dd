"""Shared fixtures and helpers: a private cache folder, small generated datasets, composed configs, and the
augmentation-distribution checks that the CPU and GPU tiers share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from PIL import Image

import melanoma.cli  # noqa: F401  (registers the resolvers the config tree uses, as every CLI does)
from melanoma.synthetic import generate_dataset
from melanoma.transforms import Pipeline, Preprocess, build_pipeline, eval_resize

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


def make_pipeline(size: int, mean, std, crop_pct: float = 0.875, interpolation: str = "bilinear",
                  **recipe) -> Pipeline:
    """A pipeline for a model that expects ``mean``/``std``, without creating one."""
    preprocess = Preprocess(size, eval_resize(size, crop_pct), crop_pct, interpolation, tuple(mean), tuple(std))
    return build_pipeline(preprocess, **recipe)


def noise_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))


SEED_RECIPE = {"scale": (0.08, 1.0), "hflip": 0.5, "rotation": 15.0, "color_jitter": (0.2, 0.2, 0.2, 0.02)}


def augmented(pipeline: Pipeline, image: Image.Image, n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """``n`` training draws of ``image``, through the workers' transform and, if any, the device's."""
    torch.manual_seed(seed)
    out = torch.stack([pipeline.train(image) for _ in range(n)])
    if pipeline.device is not None:
        assert out.dtype == torch.uint8  # the workers only decode and crop
        out = torch.cat([pipeline.device(out[i:i + 64].to(device)) for i in range(0, n, 64)])
    return out


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor) -> None:
    """Per-channel mean, spread and share of black (rotation-corner) pixels agree, in [0, 1] units."""
    # uint8 arithmetic truncates after each jitter step (about -0.5/255 each); float does not
    assert torch.allclose(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.01)
    assert torch.allclose(a.std((0, 2, 3)), b.std((0, 2, 3)), rtol=0.02)
    assert float((b == 0).all(1).float().mean()) == pytest.approx(float((a == 0).all(1).float().mean()), abs=0.01)


def structured_image() -> Image.Image:
    """A square, asymmetric, colourful image: warm left, cool right, brighter top, a yellow corner."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((48, 48, 3), np.float32)
    pixels[:, :24], pixels[:, 24:] = (200, 60, 40), (40, 150, 210)
    pixels[:16] *= 1.2
    pixels += rng.normal(0, 12, pixels.shape)
    pixels[36:, 36:] = (250, 240, 60)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def moments(x: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel mean and spread, the mean image on a 4x4 grid, the share of black pixels, and how
    much each image's per-channel mean and spread vary between draws (brightness, contrast, colour)."""
    cells = torch.nn.functional.avg_pool2d(x.mean(0, keepdim=True), 8)[0]
    return [x.mean((0, 2, 3)), x.std((0, 2, 3)), cells, (x == 0).all(1).float().mean(),
            x.mean((2, 3)).std(0), x.std((2, 3)).std(0)]


def same_moments(a: torch.Tensor, b: torch.Tensor) -> bool:
    (ma, sa, ca, za, va, wa), (mb, sb, cb, zb, vb, wb) = moments(a), moments(b)
    # tolerances: about 4 standard errors of 1024 draws (a brightness draw moves an image's mean by ~0.1)
    return bool(torch.allclose(ma, mb, atol=0.02) and torch.allclose(sa, sb, rtol=0.03)
                and torch.allclose(ca, cb, atol=0.06) and abs(za - zb) <= 0.01
                and torch.allclose(va, vb, rtol=0.1, atol=2e-3) and torch.allclose(wa, wb, rtol=0.1, atol=2e-3))


# One step at a time, with ranges wide enough to measure; scale (1, 1) on a square image makes the
# random resized crop a plain resize, so the step is all that is random.
ONE_STEP = {"hflip": {"hflip": 0.5}, "vflip": {"vflip": 0.5}, "rot90": {"rot90": True},
            "rotation": {"rotation": 30.0}, "brightness": {"color_jitter": (0.4, 0.0, 0.0, 0.0)},
            "contrast": {"color_jitter": (0.0, 0.4, 0.0, 0.0)}, "saturation": {"color_jitter": (0.0, 0.0, 0.6, 0.0)},
            "hue": {"color_jitter": (0.0, 0.0, 0.0, 0.2)}, "vignette": {"vignette": 0.5}}
