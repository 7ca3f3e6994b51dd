"""Transforms: shapes, normalisation, determinism of evaluation, exact 90-degree rotations."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.errors import ConfigError
from melanoma.transforms import (
    BatchRandomRot90,
    RandomRot90,
    RandomVignette,
    build_transforms,
    describe_vignette,
    resolve_preprocess,
    vignette_warning,
)

from conftest import (
    ONE_STEP,
    SEED_RECIPE,
    assert_same_distribution,
    augmented,
    make_pipeline,
    noise_image,
    same_moments,
    structured_image,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_eval_is_deterministic_resize_and_centre_crop() -> None:
    tf = build_transforms(32, train=False, mean=MEAN, std=STD)
    a, b = tf(noise_image()), tf(noise_image())
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
    outs = [tf(noise_image()) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_no_augmentation_trains_on_the_eval_transform() -> None:
    train = build_transforms(32, train=True, mean=MEAN, std=STD, augment=False)
    assert torch.equal(train(noise_image()), build_transforms(32, train=False, mean=MEAN, std=STD)(noise_image()))


def test_rot90_gives_exactly_the_four_rotations() -> None:
    x = torch.arange(2 * 4 * 4).reshape(2, 4, 4)
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        y = RandomRot90()(x)
        k = next(k for k in range(4) if torch.equal(y, torch.rot90(x, k, dims=(-2, -1))))
        seen.add(k)
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("recipe", [SEED_RECIPE, {"scale": (0.35, 1.0), "vflip": 0.5, "rot90": True,
                                                  "color_jitter": (0.2, 0.2, 0.15, 0.0)}], ids=["seed", "dermoscopy"])
def test_device_augmentation_matches_the_cpu_recipe_in_distribution(recipe: dict) -> None:
    # Unit normalisation: statistics in [0, 1] pixel units. The rotation's black corners move the mean
    # by ~0.025 and the jitter the spread by ~5%: a step missing on either side fails.
    cpu, device = (make_pipeline(32, (0, 0, 0), (1, 1, 1), on_device=d, **recipe) for d in (False, True))
    a, b = augmented(cpu, noise_image(), 1024, seed=0), augmented(device, noise_image(), 1024, seed=1)
    assert b.shape == a.shape == (1024, 3, 32, 32) and b.dtype == torch.float32
    assert_same_distribution(a, b)


@pytest.mark.parametrize("step", ONE_STEP)
def test_each_device_step_draws_like_its_cpu_twin(step: str) -> None:
    recipe = {"scale": (1.0, 1.0), "hflip": 0.0} | ONE_STEP[step]
    cpu, device, neither = (make_pipeline(32, (0, 0, 0), (1, 1, 1), on_device=d, **r)
                            for d, r in ((False, recipe), (True, recipe), (False, {"scale": (1.0, 1.0), "hflip": 0.0})))
    a = augmented(cpu, structured_image(), 1024, seed=0)
    assert not same_moments(a, augmented(neither, structured_image(), 64, seed=0))  # the step is visible here ...
    assert same_moments(a, augmented(device, structured_image(), 1024, seed=1))  # ... and the device does the same


def test_device_augmentation_draws_each_image_of_a_batch_independently() -> None:
    device = make_pipeline(32, MEAN, STD, on_device=True, **SEED_RECIPE).device
    torch.manual_seed(0)
    batch = torch.from_numpy(np.array(noise_image().resize((32, 32)))).permute(2, 0, 1).expand(16, 3, 32, 32)
    out = device(batch.contiguous())
    assert len({o.numpy().tobytes() for o in out}) == 16


def test_device_pipeline_without_augmentation_is_bit_identical_to_evaluation() -> None:
    pipeline = make_pipeline(32, MEAN, STD, on_device=True, augment=False)
    batch = torch.stack([pipeline.train(noise_image()) for _ in range(2)])
    assert torch.equal(pipeline.device(batch)[0], pipeline.eval(noise_image()))


def test_batch_rot90_is_exact_and_uniform_per_image() -> None:
    x = torch.arange(4 * 4).reshape(1, 1, 4, 4).expand(800, 3, 4, 4)
    torch.manual_seed(0)
    y = BatchRandomRot90()(x)
    turns = [next(k for k in range(4) if torch.equal(yi, torch.rot90(x[0], k, dims=(-2, -1)))) for yi in y]
    counts = np.bincount(turns, minlength=4)
    assert counts.sum() == 800 and all(150 <= c <= 250 for c in counts), counts


def test_vignette_blackens_outside_a_random_circle_and_leaves_the_centre() -> None:
    torch.manual_seed(0)
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    out = RandomVignette(1.0)(image)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert (out[:, 0, 0] == 0).all() and torch.equal(out[:, 24:40, 24:40], image[:, 24:40, 24:40])
    radius = torch.hypot(*torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")) / 32
    assert (out[0][radius < RandomVignette.RADIUS[0] - RandomVignette.SHIFT * 1.5] == 200).all()
    assert (out[0][radius > RandomVignette.RADIUS[1] + RandomVignette.SHIFT * 1.5] == 0).all()
    assert torch.equal(RandomVignette(0.0)(image), image)
    batch = RandomVignette(0.5)(torch.ones(1000, 1, 64, 64))  # a float batch, as on the device
    drawn = batch[:, 0, 0, 0] < 1  # at 64 px every vignette reaches the corner pixel
    assert batch.dtype == torch.float32 and 430 < drawn.sum() < 570  # each image drawn with p = 0.5
    assert torch.equal(batch[~drawn], torch.ones_like(batch[~drawn]))
    assert (batch[drawn] == 0).float().mean(dim=(1, 2, 3)).std() > 0.03  # the radii vary


@pytest.mark.parametrize("on_device", [False, True])
def test_vignette_radius_range_reaches_the_pipeline(on_device: bool) -> None:
    """augmentation.vignette_radius=[1.2, 1.3]: every vignette darkens the corners only, on both paths."""
    image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    narrow = {"scale": (1.0, 1.0), "hflip": 0.0, "vignette": 1.0, "vignette_radius": (1.2, 1.3)}
    out = augmented(make_pipeline(64, (0, 0, 0), (1, 1, 1), on_device=on_device, **narrow), image, 50, seed=0)
    radius = torch.hypot(*torch.meshgrid(torch.arange(64) - 31.5, torch.arange(64) - 31.5, indexing="ij")) / 32
    lo, hi = 1.2 - RandomVignette.EDGE - RandomVignette.SHIFT * 1.5, 1.3 + RandomVignette.SHIFT * 1.5  # shift, fade
    assert radius[0, 31] < lo  # the edges' midpoints are kept ...
    assert torch.allclose(out[:, :, radius < lo], torch.tensor(200 / 255), atol=1e-6)
    assert (out[:, :, radius > hi] == 0).all()  # ... and the corners black on every draw
    small = make_pipeline(64, (0, 0, 0), (1, 1, 1), on_device=on_device, **narrow | {"vignette_radius": (0.75, 0.8)})
    assert (augmented(small, image, 50, seed=0)[:, :, radius > 0.8 + RandomVignette.SHIFT * 1.5] == 0).all()


def test_the_vignette_is_described_and_a_radius_without_one_warned() -> None:
    assert describe_vignette({"vignette": 0.0, "vignette_radius": [1.0, 1.35]}) == ""
    assert describe_vignette({"vignette": 0.5}) == "vignette 0.5 (radius 0.75-1.35)"  # an older run: the old range
    assert describe_vignette({"vignette": 0.25, "vignette_radius": [1.0, 1.35]}) == "vignette 0.25 (radius 1-1.35)"
    assert vignette_warning({"vignette": 0.0, "vignette_radius": [0.75, 1.35]}) is None  # the defaults
    assert vignette_warning({"vignette": 0.5, "vignette_radius": [1.0, 1.35]}) is None
    assert vignette_warning({"vignette": 0.0, "vignette_radius": [1.0, 1.35]}).startswith(
        "augmentation.vignette_radius=[1.0, 1.35] does nothing while augmentation.vignette=0: set")


def test_preprocessing_is_the_models_unless_the_config_sets_it() -> None:
    model = {"mean": MEAN, "std": STD, "crop_pct": 0.9, "interpolation": "bicubic"}
    pre = resolve_preprocess(100, model)
    assert (pre.mean, pre.std, pre.crop_pct, pre.interpolation, pre.resize) == (MEAN, STD, 0.9, "bicubic", 111)
    own = resolve_preprocess(100, model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875,
                             interpolation="bilinear")
    assert (own.mean, own.std, own.crop_pct, own.interpolation, own.resize) == ((0.5,) * 3, (0.5,) * 3, 0.875,
                                                                              "bilinear", 114)
    assert resolve_preprocess(224, {"mean": MEAN, "std": STD, "crop_pct": 0.95}).resize == 235  # floor(235.79), timm's
    assert own.to_dict()["mean"] == [0.5, 0.5, 0.5]  # plain lists for JSON and weights_only checkpoints
    with pytest.raises(ConfigError, match=r"interpolation 'lanczos' \(augmentation.interpolation, or the model's "
                                          r"timm config\) is not one of"):
        resolve_preprocess(32, model, interpolation="lanczos")
    with pytest.raises(ConfigError, match=r"augmentation.crop_pct=1.5 must be in \(0, 1\]"):
        resolve_preprocess(32, model, crop_pct=1.5)


def test_timm_preprocessing_of_a_real_model_reaches_the_eval_transform() -> None:
    import timm

    from melanoma.models import model_data_config
    from melanoma.transforms import eval_transform

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=1)
    pre = resolve_preprocess(32, model_data_config(model))
    assert (pre.crop_pct, pre.interpolation, pre.resize) == (0.95, "bicubic", 33)
    resize = eval_transform(pre.to_dict()).transforms[1]
    assert (resize.size, resize.interpolation.value) == ([33], "bicubic")


def test_device_augmentation_without_kornia_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r"augmentation.on_device=true needs kornia .*pip install kornia"):
        make_pipeline(32, MEAN, STD, on_device=True)
    assert make_pipeline(32, MEAN, STD, on_device=True, augment=False).device is not None  # no kornia needed


def test_a_record_from_before_resize_was_recorded_evaluates_as_it_trained() -> None:
    from melanoma.transforms import eval_transform

    old = {"image_size": 32, "crop_pct": 0.875, "mean": MEAN, "std": STD}  # session 4: round(), bilinear
    resize = eval_transform(old).transforms[1]
    assert (resize.size, resize.interpolation.value) == ([37], "bilinear")  # round(36.57); floor gives 36
    new = resolve_preprocess(32, {"mean": MEAN, "std": STD, "crop_pct": 0.875, "interpolation": "bicubic"})
    assert eval_transform(new.to_dict()).transforms[1].size == [36] == [new.resize]
    assert eval_transform(new.to_dict() | {"resize": 40}).transforms[1].size == [40]  # the record wins


def test_no_vignette_is_described_where_augment_is_off() -> None:
    """augmentation=none augmentation.vignette=0.5 draws nothing: augment=false skips every training step."""
    assert describe_vignette({"augment": False, "vignette": 0.5}) == ""
    pipeline = make_pipeline(32, (0, 0, 0), (1, 1, 1), augment=False, vignette=1.0)
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    assert (pipeline.train(image) > 0.7).all()  # no black corners
