"""Transforms: shapes, normalisation, determinism of evaluation, exact 90-degree rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.transforms import RandomRot90, build_transforms

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
