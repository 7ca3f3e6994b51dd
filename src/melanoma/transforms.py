"""Augmentation and preprocessing recipes, built from torchvision transforms v2 (and kornia on a device)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision.transforms import v2

from melanoma.errors import ConfigError

CROP_PCT = 0.875  # timm's and torchvision's default share of the resized image kept by the centre crop
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """torchvision's mode for timm's interpolation name (``bilinear``, ``bicubic``, ``nearest``).

    Raises:
        ConfigError: another name.
    """
    if name not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {name!r} (augmentation.interpolation, or the model's timm config) is not "
                          f"one of {', '.join(INTERPOLATIONS)}; set augmentation.interpolation=bicubic or bilinear")
    return INTERPOLATIONS[name]


class RandomRot90(nn.Module):
    """Rotate by a random multiple of 90 degrees: exact and label-preserving for dermoscopy."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


class BatchRandomRot90(nn.Module):
    """:class:`RandomRot90` drawn for each image of a square ``(B, C, H, W)`` batch, without a device sync.

    kornia's ``RandomRotation90`` resamples through a warp and rounds a continuous draw, which
    gives the 0 and 270 degree views half the odds of the others; this is exact and uniform.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = torch.randint(4, (len(images), 1, 1, 1), device=images.device)
        out = images
        for turns in (1, 2, 3):
            out = torch.where(k == turns, torch.rot90(images, turns, dims=(-2, -1)), out)
        return out


class RandomVignette(nn.Module):
    """Darken each image outside a random circle with probability ``p``, as a dermoscope's vignette does.

    Many dermoscopy archives photograph malignant lesions with a dark vignette more often than benign
    ones (ISIC UDA-1: 6.4% against 1.1% of the corner pixels are near-black), so a model can learn the
    dark corners as evidence of melanoma (docs/results.md, "Is the demo model looking at the lesion?").
    Drawing synthetic vignettes on benign and malignant images alike takes that cue away. The circle's
    radius is drawn uniformly in ``radius`` (in units of half the image's side: 1 touches the
    edges' midpoints, sqrt(2) the corners; :attr:`RADIUS` by default, ``augmentation.vignette_radius``),
    its centre within :attr:`SHIFT` of the image's, and it
    fades to black over :attr:`EDGE`. Works on one ``(C, H, W)`` image (the loader's workers) and on a
    ``(B, C, H, W)`` batch on any device (``augmentation.on_device``), each image drawn independently;
    the draws come from torch's CPU generator, so a batch on a GPU needs no sync.
    """

    RADIUS = (0.75, 1.35)
    SHIFT = 0.08
    EDGE = 0.08

    def __init__(self, p: float, radius: Sequence[float] = RADIUS) -> None:
        super().__init__()
        self.p = float(p)
        self.radius = (float(radius[0]), float(radius[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images if images.ndim == 4 else images.unsqueeze(0)
        n, _, height, width = batch.shape
        device = batch.device  # a few numbers per image are drawn on the CPU and copied; the masks are made there
        on = (torch.rand(n) < self.p).to(device)
        radius = torch.empty(n).uniform_(*self.radius).to(device)
        centre = torch.empty(n, 2).uniform_(-self.SHIFT, self.SHIFT).to(device)
        y = (torch.arange(height, device=device) - (height - 1) / 2) / (height / 2)
        x = (torch.arange(width, device=device) - (width - 1) / 2) / (width / 2)
        distance = torch.hypot(y.view(1, -1, 1) - centre[:, :1, None], x.view(1, 1, -1) - centre[:, 1:, None])
        mask = ((radius.view(-1, 1, 1) - distance) / self.EDGE).clamp(0, 1)
        mask = torch.where(on.view(-1, 1, 1), mask, torch.ones((), device=device))
        out = batch * mask.unsqueeze(1)
        if not batch.is_floating_point():
            out = out.round_().to(batch.dtype)
        return out if images.ndim == 4 else out[0]


def describe_vignette(augmentation: Mapping) -> str:
    """The synthetic vignette of an augmentation config, for logs, titles and model cards: ``""`` when it draws
    none (``vignette`` 0, or ``augment`` false), else e.g. ``"vignette 0.5 (radius 1.0-1.35)"``."""
    if not augmentation.get("vignette") or augmentation.get("augment") is False:
        return ""
    low, high = augmentation.get("vignette_radius") or RandomVignette.RADIUS
    return f"vignette {augmentation['vignette']:g} (radius {low:g}-{high:g})"


def vignette_warning(augmentation: Mapping) -> str | None:
    """One line when ``vignette_radius`` is set away from its default but ``vignette`` is 0, so it does nothing."""
    radius = tuple(augmentation.get("vignette_radius") or RandomVignette.RADIUS)
    if augmentation.get("vignette") or radius == RandomVignette.RADIUS:
        return None
    return (f"augmentation.vignette_radius={list(radius)} does nothing while augmentation.vignette=0: "
            "set augmentation.vignette=P (e.g. 0.5) to draw vignettes on a share P of the training images")


def eval_resize(image_size: int, crop_pct: float) -> int:
    """Short side the evaluation transform resizes to before its centre crop of ``image_size``.

    The decode-once cache stores images at this edge by default, which keeps evaluation tensors
    bit-identical with and without it: resizing to the size an image already has is a no-op.
    Floored, as timm's ``transforms_imagenet_eval`` does.
    """
    return math.floor(image_size / crop_pct)


def build_transforms(
    image_size: int,
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    crop_pct: float = CROP_PCT,
    interpolation: str = "bilinear",
    resize: int | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rot90: bool = False,
    rotation: float = 0.0,
    color_jitter: Sequence[float] | None = None,
    vignette: float = 0.0,
    vignette_radius: Sequence[float] = RandomVignette.RADIUS,
    on_device: bool = False,
) -> v2.Compose:
    """Build the transform that turns a PIL image into a normalised float tensor.

    Evaluation resizes the short side to ``image_size / crop_pct`` and takes the centre
    crop. Training (with ``augment``) takes a random resized crop, then flips, rotations,
    synthetic vignettes and colour jitter. Geometric steps run on uint8 tensors, which is cheaper than floats.
    With ``on_device`` the training transform stops after the crop and returns uint8 pixels:
    :func:`build_device_transform` does the rest on whole batches.

    Args:
        image_size: edge of the square tensor the model sees.
        train: build the training transform (else the deterministic evaluation one).
        mean: per-channel normalisation mean (in [0, 1] units).
        std: per-channel normalisation std.
        augment: with ``False`` the training transform equals the evaluation transform.
        crop_pct: share of the resized image kept by the evaluation centre crop.
        interpolation: resampling of every resize (``bilinear``, ``bicubic``, ``nearest``).
        resize: short side of the evaluation resize; ``None`` is :func:`eval_resize` of ``image_size``
            and ``crop_pct``.
        scale: area range of the random resized crop.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rot90: rotate by a random multiple of 90 degrees.
        rotation: maximal extra rotation in degrees (0 for none).
        color_jitter: brightness, contrast, saturation, hue; ``None`` for none.
        vignette: probability of a synthetic dark vignette (:class:`RandomVignette`; 0 for none).
        vignette_radius: range ``[min, max]`` of the vignette circle's radius, in half-sides.
        on_device: (training only) leave everything after the crop, normalisation included,
            to the device transform.

    Returns:
        The composed transform.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"augmentation.crop_pct={crop_pct} must be in (0, 1]")
    mode = interpolation_mode(interpolation)
    steps: list = [v2.ToImage()]
    if train and augment:
        steps.append(v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=mode, antialias=True))
    else:
        steps += [v2.Resize(resize or eval_resize(image_size, crop_pct), interpolation=mode, antialias=True),
                  v2.CenterCrop(image_size)]
    if train and on_device:  # only what needs the whole, variably sized image stays on the CPU
        return v2.Compose([*steps, v2.ToPureTensor()])
    if train and augment:
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if vflip > 0:
            steps.append(v2.RandomVerticalFlip(vflip))
        if rot90:
            steps.append(RandomRot90())
        if rotation > 0:
            steps.append(v2.RandomRotation(rotation))
        if vignette > 0:
            steps.append(RandomVignette(vignette, vignette_radius))
        if color_jitter is not None:
            steps.append(v2.ColorJitter(*color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)


def build_device_transform(
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    hflip: float = 0.5,
    vflip: float = 0.0,
    rot90: bool = False,
    rotation: float = 0.0,
    color_jitter: Sequence[float] | None = None,
    vignette: float = 0.0,
    vignette_radius: Sequence[float] = RandomVignette.RADIUS,
) -> nn.Sequential:
    """The rest of the training recipe after :func:`build_transforms` with ``on_device=True``.

    Runs on a uint8 ``(B, C, H, W)`` batch already on the training device and draws the flips,
    rotations and colour-jitter factors independently for each image (kornia), so the GPU does the
    work that otherwise needs several CPU cores per accelerator. Same recipe and parameter ranges
    as the CPU path (nearest-neighbour rotation about the centre with zero fill, torchvision's
    jitter formulas), in float instead of uint8 arithmetic: statistically equivalent, not
    bit-identical. One difference: kornia draws the order of the four jitter steps once per batch
    (torchvision per image); each image's distribution is the same.

    The module holds no tensors and is not moved to the device: kornia then draws its parameters
    from torch's CPU generator (saved in checkpoints, no device sync to read them) and copies them
    over; only the 90-degree turns are drawn on the device.

    Args:
        mean, std: per-channel normalisation (in [0, 1] units).
        augment: with ``False`` only scale and normalise.
        hflip, vflip, rot90, rotation, color_jitter, vignette, vignette_radius: as in :func:`build_transforms`.

    Returns:
        A module mapping uint8 batches to normalised float32 batches.
    """
    steps: list[nn.Module] = [v2.ToDtype(torch.float32, scale=True)]
    if augment:
        try:  # imported only when used: a second or two at start-up
            import kornia.augmentation as K  # noqa: N812 - kornia's own convention
        except ImportError as exc:
            raise ConfigError(f"augmentation.on_device=true needs kornia ({exc}); pip install kornia, or set "
                              "augmentation.on_device=false") from None

        if hflip > 0:
            steps.append(K.RandomHorizontalFlip(p=hflip))
        if vflip > 0:
            steps.append(K.RandomVerticalFlip(p=vflip))
        if rot90:
            steps.append(BatchRandomRot90())
        if rotation > 0:
            steps.append(K.RandomRotation(rotation, resample="nearest", align_corners=False, p=1.0))
        if vignette > 0:
            steps.append(RandomVignette(vignette, vignette_radius))
        if color_jitter is not None:
            steps.append(K.ColorJitter(*color_jitter, p=1.0))
    steps.append(v2.Normalize(list(mean), list(std)))
    return nn.Sequential(*steps)


PREPROCESS_KEYS = ("mean", "std", "crop_pct", "interpolation")  # augmentation keys that override the model's


def split_augmentation(augmentation: dict) -> tuple[dict, dict]:
    """The ``augmentation`` config group as ``(preprocessing overrides, recipe)``: the keyword arguments of
    :func:`resolve_preprocess` (``None`` where the model's own value stands) and of :func:`build_pipeline`."""
    recipe = {k: v for k, v in augmentation.items() if k not in PREPROCESS_KEYS}
    return {k: augmentation.get(k) for k in PREPROCESS_KEYS}, recipe


@dataclass(frozen=True)
class Preprocess:
    """How a model's input is made from an image: what a run records in ``preprocess.json`` and its checkpoints.

    Attributes:
        image_size: edge of the square tensor the model sees.
        resize: short side the evaluation transform resizes to (``floor(image_size / crop_pct)``).
        crop_pct: share of the resized image kept by the centre crop.
        interpolation: resampling of every resize.
        mean, std: per-channel normalisation (in [0, 1] units).
    """

    image_size: int
    resize: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        """Plain values (lists, not tuples) for JSON and ``weights_only`` checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def resolve_preprocess(image_size: int, model_config: dict, *, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, crop_pct: float | None = None,
                       interpolation: str | None = None) -> Preprocess:
    """The model's own preprocessing (timm's ``resolve_data_config``), with the config's non-null values on top.

    Args:
        image_size: edge of the square input (``data.image_size``; the model's default size is not used).
        model_config: ``timm.data.resolve_data_config({}, model=model)`` of the model.
        mean, std, crop_pct, interpolation: overrides (``augmentation.*``); ``None`` keeps the model's.

    Raises:
        ConfigError: a crop share outside (0, 1] or an unknown interpolation.
    """
    crop_pct = float(crop_pct if crop_pct is not None else model_config.get("crop_pct", CROP_PCT))
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"augmentation.crop_pct={crop_pct} must be in (0, 1]")
    interpolation = interpolation or model_config.get("interpolation", "bilinear")
    interpolation_mode(interpolation)
    return Preprocess(int(image_size), eval_resize(image_size, crop_pct), crop_pct, interpolation,
                      tuple(float(v) for v in (mean or model_config["mean"])),
                      tuple(float(v) for v in (std or model_config["std"])))


@dataclass
class Pipeline:
    """Everything a training run's images go through, resolved from the augmentation config.

    Attributes:
        train: per-image training transform (run by the loader's workers).
        eval: per-image evaluation transform.
        device: batched rest of the training transform on the device, or ``None``.
        preprocess: what a checkpoint must record for inference.
    """

    train: v2.Compose
    eval: v2.Compose
    device: nn.Sequential | None
    preprocess: Preprocess


def build_pipeline(preprocess: Preprocess, *, name: str = "", on_device: bool = False, **recipe) -> Pipeline:
    """The training, evaluation and device transforms of one augmentation config group.

    Args:
        preprocess: the model's input (from :func:`resolve_preprocess`).
        name: the recipe's name (only descriptive).
        on_device: run the batched part of the training transform on the device.
        **recipe: the remaining keyword arguments of :func:`build_transforms` (augment, scale, flips, ...).
    """
    mean, std = list(preprocess.mean), list(preprocess.std)
    device = None
    if on_device:
        keys = ("augment", "hflip", "vflip", "rot90", "rotation", "color_jitter", "vignette", "vignette_radius")
        device = build_device_transform(mean=mean, std=std, **{k: recipe[k] for k in keys if k in recipe})
    common = {"mean": mean, "std": std, "crop_pct": preprocess.crop_pct, "interpolation": preprocess.interpolation,
              "resize": preprocess.resize} | recipe
    return Pipeline(build_transforms(preprocess.image_size, train=True, on_device=on_device, **common),
                    build_transforms(preprocess.image_size, train=False, **common), device, preprocess)


def eval_pixels(preprocess: dict) -> v2.Compose:
    """:func:`eval_transform` up to its centre crop: the uint8 ``(3, S, S)`` pixels an exported model takes.

    The float conversion and normalisation that follow in :func:`eval_transform` are inside the
    exported graph (:mod:`melanoma.export`), so an app that resizes and crops as this does gets the
    tensors melanoma-eval scores.
    """
    steps = eval_transform(preprocess).transforms
    tail = [type(step) for step in steps[-3:]]
    if tail != [v2.ToDtype, v2.Normalize, v2.ToPureTensor]:
        raise RuntimeError(f"eval_transform ends with {tail}, not the float conversion and normalisation")
    return v2.Compose([*steps[:-3], v2.ToPureTensor()])


def eval_transform(preprocess: dict) -> v2.Compose:
    """The evaluation transform of a recorded preprocessing (a checkpoint's or ``preprocess.json``'s).

    Records from before ``resize`` and ``interpolation`` were recorded (session 4 and earlier) are
    evaluated as they trained: bilinear, resized to ``round(image_size / crop_pct)``.
    """
    size, crop = preprocess["image_size"], preprocess["crop_pct"]
    return build_transforms(size, train=False, mean=preprocess["mean"], std=preprocess["std"], crop_pct=crop,
                            interpolation=preprocess.get("interpolation", "bilinear"),
                            resize=preprocess.get("resize", round(size / crop)))
