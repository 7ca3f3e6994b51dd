"""Transforms: shapes, normalisation, determinism of evaluation, exact 90-degree rotations."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.errors import ConfigError
from melanoma.transforms import BatchRandomRot90, Pipeline, RandomRot90, build_pipeline, build_transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))


def test_eval_is_deterministic_resize_and_centre_crop() -> None:
    tf = build_transforms(32, train=False, mean=MEAN, std=STD)
    a, b = tf(_image()), tf(_image())
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)


def test_normalisation_uses_the_given_mean_and_std() -> None:
    grey = Image.new("RGB", (40, 40), (128, 128, 128))
    out = build_transforms(16, train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(grey)
    assert torch.allclose(out, torch.full_like(out, (128 / 255 - 0.5) / 0.5), atol=1e-6)
    assert type(out) is torch.Tensor  # a plain tensor, not a tv_tensors.Image


@pytest.mark.parametrize("recipe", [{}, {"vflip": 0.5, "rot90": True, "rotation": 10.0,
                                         "color_jitter": (0.2, 0.2, 0.2, 0.02)}])
def test_train_transform_is_random_with_the_right_shape(recipe: dict) -> None:
    tf = build_transforms(24, train=True, mean=MEAN, std=STD, **recipe)
    torch.manual_seed(0)
    outs = [tf(_image()) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_no_augmentation_trains_on_the_eval_transform() -> None:
    train = build_transforms(32, train=True, mean=MEAN, std=STD, augment=False)
    assert torch.equal(train(_image()), build_transforms(32, train=False, mean=MEAN, std=STD)(_image()))


def test_rot90_gives_exactly_the_four_rotations() -> None:
    x = torch.arange(2 * 4 * 4).reshape(2, 4, 4)
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        y = RandomRot90()(x)
        k = next(k for k in range(4) if torch.equal(y, torch.rot90(x, k, dims=(-2, -1))))
        seen.add(k)
    assert seen == {0, 1, 2, 3}


SEED_RECIPE = {"scale": (0.08, 1.0), "hflip": 0.5, "rotation": 15.0, "color_jitter": (0.2, 0.2, 0.2, 0.02)}


def _augmented(pipeline: Pipeline, image: Image.Image, n: int, seed: int, device: str = "cpu") -> torch.Tensor:
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


@pytest.mark.parametrize("recipe", [SEED_RECIPE, {"scale": (0.35, 1.0), "vflip": 0.5, "rot90": True,
                                                  "color_jitter": (0.2, 0.2, 0.15, 0.0)}], ids=["seed", "dermoscopy"])
def test_device_augmentation_matches_the_cpu_recipe_in_distribution(recipe: dict) -> None:
    # Unit normalisation: statistics in [0, 1] pixel units. The rotation's black corners move the mean
    # by ~0.025 and the jitter the spread by ~5%: a step missing on either side fails.
    cpu, device = (build_pipeline(32, (0, 0, 0), (1, 1, 1), on_device=d, **recipe) for d in (False, True))
    a, b = _augmented(cpu, _image(), 1024, seed=0), _augmented(device, _image(), 1024, seed=1)
    assert b.shape == a.shape == (1024, 3, 32, 32) and b.dtype == torch.float32
    assert_same_distribution(a, b)


def _structured() -> Image.Image:
    """A square, asymmetric, colourful image: warm left, cool right, brighter top, a yellow corner."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((48, 48, 3), np.float32)
    pixels[:, :24], pixels[:, 24:] = (200, 60, 40), (40, 150, 210)
    pixels[:16] *= 1.2
    pixels += rng.normal(0, 12, pixels.shape)
    pixels[36:, 36:] = (250, 240, 60)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _moments(x: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel mean and spread, the mean image on a 4x4 grid, the share of black pixels, and how
    much each image's per-channel mean and spread vary between draws (brightness, contrast, colour)."""
    cells = torch.nn.functional.avg_pool2d(x.mean(0, keepdim=True), 8)[0]
    return [x.mean((0, 2, 3)), x.std((0, 2, 3)), cells, (x == 0).all(1).float().mean(),
            x.mean((2, 3)).std(0), x.std((2, 3)).std(0)]


def _same_moments(a: torch.Tensor, b: torch.Tensor) -> bool:
    (ma, sa, ca, za, va, wa), (mb, sb, cb, zb, vb, wb) = _moments(a), _moments(b)
    # tolerances: about 4 standard errors of 1024 draws (a brightness draw moves an image's mean by ~0.1)
    return bool(torch.allclose(ma, mb, atol=0.02) and torch.allclose(sa, sb, rtol=0.03)
                and torch.allclose(ca, cb, atol=0.06) and abs(za - zb) <= 0.01
                and torch.allclose(va, vb, rtol=0.1, atol=2e-3) and torch.allclose(wa, wb, rtol=0.1, atol=2e-3))


# One step at a time, with ranges wide enough to measure; scale (1, 1) on a square image makes the
# random resized crop a plain resize, so the step is all that is random.
ONE_STEP = {"hflip": {"hflip": 0.5}, "vflip": {"vflip": 0.5}, "rot90": {"rot90": True},
            "rotation": {"rotation": 30.0}, "brightness": {"color_jitter": (0.4, 0.0, 0.0, 0.0)},
            "contrast": {"color_jitter": (0.0, 0.4, 0.0, 0.0)}, "saturation": {"color_jitter": (0.0, 0.0, 0.6, 0.0)},
            "hue": {"color_jitter": (0.0, 0.0, 0.0, 0.2)}}


@pytest.mark.parametrize("step", ONE_STEP)
def test_each_device_step_draws_like_its_cpu_twin(step: str) -> None:
    recipe = {"scale": (1.0, 1.0), "hflip": 0.0} | ONE_STEP[step]
    cpu, device, neither = (build_pipeline(32, (0, 0, 0), (1, 1, 1), on_device=d, **r)
                            for d, r in ((False, recipe), (True, recipe), (False, {"scale": (1.0, 1.0), "hflip": 0.0})))
    a = _augmented(cpu, _structured(), 1024, seed=0)
    assert not _same_moments(a, _augmented(neither, _structured(), 64, seed=0))  # the step is visible here ...
    assert _same_moments(a, _augmented(device, _structured(), 1024, seed=1))  # ... and the device does the same


def test_device_augmentation_draws_each_image_of_a_batch_independently() -> None:
    device = build_pipeline(32, MEAN, STD, on_device=True, **SEED_RECIPE).device
    torch.manual_seed(0)
    batch = torch.from_numpy(np.array(_image().resize((32, 32)))).permute(2, 0, 1).expand(16, 3, 32, 32)
    out = device(batch.contiguous())
    assert len({o.numpy().tobytes() for o in out}) == 16


def test_device_pipeline_without_augmentation_is_bit_identical_to_evaluation() -> None:
    pipeline = build_pipeline(32, MEAN, STD, on_device=True, augment=False)
    batch = torch.stack([pipeline.train(_image()) for _ in range(2)])
    assert torch.equal(pipeline.device(batch)[0], pipeline.eval(_image()))


def test_batch_rot90_is_exact_and_uniform_per_image() -> None:
    x = torch.arange(4 * 4).reshape(1, 1, 4, 4).expand(800, 3, 4, 4)
    torch.manual_seed(0)
    y = BatchRandomRot90()(x)
    turns = [next(k for k in range(4) if torch.equal(yi, torch.rot90(x[0], k, dims=(-2, -1)))) for yi in y]
    counts = np.bincount(turns, minlength=4)
    assert counts.sum() == 800 and all(150 <= c <= 250 for c in counts), counts


def test_pipeline_takes_the_models_normalisation_unless_the_config_sets_one() -> None:
    assert build_pipeline(32, MEAN, STD, name="seed", mean=None, std=None).mean == list(MEAN)
    own = build_pipeline(32, MEAN, STD, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    assert (own.mean, own.std, own.crop_pct, own.device) == ([0.5] * 3, [0.5] * 3, 1.0, None)


def test_device_augmentation_without_kornia_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r"augmentation.on_device=true needs kornia .*pip install kornia"):
        build_pipeline(32, MEAN, STD, on_device=True)
    assert build_pipeline(32, MEAN, STD, on_device=True, augment=False).device is not None  # no kornia needed
