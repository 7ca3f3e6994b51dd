"""Augmentation and preprocessing recipes, built from torchvision transforms v2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees: exact and label-preserving for dermoscopy."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


def eval_resize(image_size: int, crop_pct: float) -> int:
    """Short side the evaluation transform resizes to before its centre crop of ``image_size``.

    The decode-once cache stores images at this edge by default, which keeps evaluation tensors
    bit-identical with and without it: resizing to the size an image already has is a no-op.
    """
    return round(image_size / crop_pct)


def build_transforms(
    image_size: int,
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    crop_pct: float = 0.875,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rot90: bool = False,
    rotation: float = 0.0,
    color_jitter: Sequence[float] | None = None,
) -> v2.Compose:
    """Build the transform that turns a PIL image into a normalised float tensor.

    Evaluation resizes the short side to ``image_size / crop_pct`` and takes the centre
    crop. Training (with ``augment``) takes a random resized crop, then flips, rotations
    and colour jitter. Geometric steps run on uint8 tensors, which is cheaper than floats.

    Args:
        image_size: edge of the square tensor the model sees.
        train: build the training transform (else the deterministic evaluation one).
        mean: per-channel normalisation mean (in [0, 1] units).
        std: per-channel normalisation std.
        augment: with ``False`` the training transform equals the evaluation transform.
        crop_pct: share of the resized image kept by the evaluation centre crop.
        scale: area range of the random resized crop.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rot90: rotate by a random multiple of 90 degrees.
        rotation: maximal extra rotation in degrees (0 for none).
        color_jitter: brightness, contrast, saturation, hue; ``None`` for none.

    Returns:
        The composed transform.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"augmentation.crop_pct={crop_pct} must be in (0, 1]")
    steps: list = [v2.ToImage()]
    if train and augment:
        steps.append(v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True))
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if vflip > 0:
            steps.append(v2.RandomVerticalFlip(vflip))
        if rot90:
            steps.append(RandomRot90())
        if rotation > 0:
            steps.append(v2.RandomRotation(rotation))
        if color_jitter is not None:
            steps.append(v2.ColorJitter(*color_jitter))
    else:
        steps += [v2.Resize(eval_resize(image_size, crop_pct), antialias=True), v2.CenterCrop(image_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)
