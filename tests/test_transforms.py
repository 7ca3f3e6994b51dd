"""Transforms: shapes, normalisation, determinism of evaluation, exact 90-degree rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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
