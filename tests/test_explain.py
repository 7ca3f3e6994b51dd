"""melanoma-explain: Grad-CAM layer choice per architecture family, maps, and the CLI on a tiny run."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from timm.models.resnet import Bottleneck, ResNet

from melanoma.checkpoint import load_checkpoint
from melanoma.cli.explain import explain_run
from melanoma.cli.train import train
from melanoma.errors import ConfigError, DataError
from melanoma.gradcam import (
    attention_shares,
    attention_summary,
    default_out,
    explain,
    grad_cam,
    select_images,
    target_layer,
    target_layer_name,
)
from melanoma.inference import Ensemble
from melanoma.occlusion import corner_mask, occlusion_summary, occlusion_test, shortcut_warning
from melanoma.runtime import resolve_runtime

from conftest import TINY, make_config

CPU = resolve_runtime("cpu", "fp32")


def _tiny_resnext() -> torch.nn.Module:
    """A ResNeXt (grouped bottlenecks) a few hundred kB big; timm's resnext names are all full size."""
    return ResNet(Bottleneck, (1, 1, 1, 1), num_classes=1, cardinality=4, base_width=16, stem_width=16,
                  channels=(16, 32, 64, 128))


FAMILIES = {
    "resnet": (lambda: timm.create_model("test_resnet", num_classes=1), "layer4"),
    "resnext": (_tiny_resnext, "layer4"),
    "mobilenetv2": (lambda: timm.create_model("mobilenetv2_035", num_classes=1), "conv_head"),
    "efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=1), "conv_head"),
    "other (feature_info)": (lambda: timm.create_model("test_convnext", num_classes=1), "stages.3"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_cam_is_an_image_sized_map_from_the_family_layer(family: str) -> None:
    make, layer_name = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    assert target_layer_name(model) == layer_name and target_layer(model) is model.get_submodule(layer_name)
    if family == "resnext":
        assert model.layer4[0].conv2.groups == 4
    images = torch.randn(2, 3, 64, 64)
    own = grad_cam(model, images)  # each image explained for the model's own decision
    both = grad_cam(model, images.repeat(2, 1, 1, 1), [0, 0, 1, 1])  # benign, then malignant
    for maps in (own, both):
        assert maps.shape == (len(maps), 64, 64) and maps.min() >= 0 and maps.max() <= 1
    # The benign map is the ReLU of minus the malignant one: where a map varies, one of the two must.
    spread = both.std(axis=(1, 2)).reshape(2, 2)
    assert (spread.max(axis=0) > 0.01).all()
    assert any(np.array_equal(own[i], both[i + 2 * k]) for i in range(2) for k in range(2))


class _BrightSpotDetector(torch.nn.Module):
    """Logit = mean brightness of the first channel, through one conv feature map Grad-CAM can weigh."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(3, 2, 1, bias=False)
        self.head = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[:, 0] = 1.0  # both channels see the red channel
            self.head.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean((2, 3)))


def test_grad_cam_lights_up_the_evidence_for_the_explained_class() -> None:
    model = _BrightSpotDetector().eval()
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, 4:20, 40:56] = 1.0  # a bright patch in the top-right corner raises the malignant logit
    malignant, benign = grad_cam(model, image.repeat(2, 1, 1, 1), [1, 0], layer=model.features)
    inside = np.zeros((64, 64), bool)
    inside[4:20, 40:56] = True
    assert malignant[inside].mean() > 0.95 and malignant[~inside].max() < 0.05  # the patch, and only it
    assert malignant.max() == pytest.approx(1.0)
    assert benign.max() == 0  # nothing in the image is evidence against malignancy: an empty map


def test_a_token_model_is_refused_with_the_way_out() -> None:
    model = timm.create_model("test_vit", num_classes=1).eval()
    with pytest.raises(ConfigError, match=r"blocks\.5 of test_vit outputs \(1, 5, 64\); use a convolutional"):
        grad_cam(model, torch.randn(1, 3, 32, 32))


def test_selection_is_reproducible_and_needs_both_classes() -> None:
    records = pd.DataFrame({"path": [f"{i}.jpg" for i in range(20)], "label": [i % 2 for i in range(20)]})
    a = select_images(records, 3, 1, ("benign", "malignant"), "x")
    assert a.equals(select_images(records, 3, 1, ("benign", "malignant"), "x"))
    assert a["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert not a.equals(select_images(records, 3, 2, ("benign", "malignant"), "x"))
    assert len(select_images(records, 50, 0, ("benign", "malignant"), "x")) == 20
    with pytest.raises(DataError, match="the test split has no malignant images to explain; pass split=all"):
        select_images(records[records["label"] == 0], 3, 0, ("benign", "malignant"), "the test split")


@pytest.fixture(scope="module")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explained")
    train(make_config([f"data.root={tiny_data}", *TINY, "data.image_size=64", "trainer.epochs=1", "cv.folds=2",
                       "audit.enabled=false"]), out)
    return out


def test_explain_writes_maps_and_table_into_the_run(run_dir: Path) -> None:
    explain_run(make_config([f"ckpt={run_dir}", "n=3", "trainer.device=cpu"], "explain"))  # what the CLI runs
    Image.open(run_dir / "explain" / "activation_maps.png").verify()
    table = pd.read_csv(run_dir / "explain" / "explain.csv")
    assert list(table.columns) == ["path", "label", "prob", "pred", "cam_lesion", "lesion_area", "cam_corners",
                                   "corner_area", "peak"] and table["label"].tolist() == [0] * 3 + [1] * 3
    shares = table[["cam_lesion", "lesion_area", "cam_corners", "corner_area"]].dropna()
    assert shares.stack().between(0, 1).all() and set(table["peak"]) <= {"lesion", "corner", "skin", "none"}
    assert all("/test/" in p for p in table["path"]) and table["prob"].between(0, 1).all()
    threshold = load_checkpoint(run_dir / "fold0" / "best.pt")["thresholds"]["sens95"]
    assert (table["pred"] == (table["prob"] >= threshold)).all()
    occluded = json.loads((run_dir / "explain" / "occlusion.json").read_text())
    assert occluded["split"] == "test" and occluded["n_images"] == 20 and occluded["n_positive"] == 10  # all of it
    assert set(occluded["auc"]) == set(occluded["mean_prob"]) == {"none", "corners", "centre", "vignette"}
    assert set(occluded["difference"]) == {"corners", "centre", "vignette"}
    shift = occluded["vignette_shift"]
    assert shift["ci"][0] <= shift["value"] <= shift["ci"][1]
    for region in ("corners", "centre", "vignette"):
        assert occluded["difference"][region]["difference"]["value"] == pytest.approx(
            occluded["auc"][region] - occluded["auc"]["none"])


def test_input_images_have_unknown_labels(run_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(tiny_data / "test" / "benign", folder)
    ckpt = run_dir / "fold1" / "best.pt"
    assert default_out(ckpt) == default_out(run_dir) == run_dir / "explain"
    table = explain(ckpt, CPU, input=folder, n=2, threshold=0.5, out=tmp_path / "out")
    assert len(table) == 4 and table["label"].isna().all() and (table["pred"] == (table["prob"] >= 0.5)).all()
    assert table["path"].is_unique and all(Path(p).parent == folder for p in table["path"])  # 2n of the 10
    again = explain(ckpt, CPU, input=folder, n=2, threshold=0.5, out=tmp_path / "again")
    assert again["path"].tolist() == table["path"].tolist()  # drawn reproducibly from seed=0
    assert np.allclose(again["prob"], table["prob"])
    written = pd.read_csv(tmp_path / "out" / "explain.csv")
    assert written["path"].tolist() == table["path"].tolist() and written["label"].isna().all()
    Image.open(tmp_path / "out" / "activation_maps.png").verify()


def test_attention_shares_find_the_lesion_and_the_corners() -> None:
    size = 64
    y, x = np.ogrid[:size, :size]
    disk = (y - 31.5) ** 2 + (x - 31.5) ** 2 < 14 ** 2  # a dark brown lesion in the middle of light skin
    rgb = np.where(disk[..., None], [0.35, 0.2, 0.12], [0.85, 0.68, 0.6])[None].repeat(4, 0).astype(np.float32)
    corners = corner_mask(size, size)
    assert corners.mean() == pytest.approx(1 - np.pi / 4, abs=0.02) and not corners[32, 32] and corners[0, 0]
    maps = np.stack([disk, corners, np.ones((size, size)), np.zeros((size, size))]).astype(np.float32)
    table = attention_shares(rgb, maps)
    assert table["lesion_area"].tolist() == pytest.approx([disk.mean()] * 4)  # Otsu split off exactly the disk
    assert table["corner_area"].tolist() == pytest.approx([corners.mean()] * 4)
    assert table["cam_lesion"].tolist()[:3] == pytest.approx([1.0, 0.0, disk.mean()])  # a uniform map: the area
    assert table["cam_corners"].tolist()[:3] == pytest.approx([0.0, 1.0, corners.mean()])
    assert table["peak"].tolist() == ["lesion", "corner", "corner", "none"] and table.iloc[3].isna().sum() == 2
    said = attention_summary(table)
    assert "on the lesion 0.38 (its area: 0.15), in the corners 0.40 (their area: 0.21)" in said
    assert "1 on the lesion, 2 in a corner, 0 on skin, of 4" in said


class CornerReader(torch.nn.Module):
    """A "model" whose logit is the brightness of the image's corners (``sign`` -1: their darkness): a pure shortcut."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, torch.from_numpy(corner_mask(*x.shape[-2:]))].mean(dim=(1, 2))[:, None] * 10 * self.sign


def corner_images(tmp_path: Path, dark_is_malignant: bool) -> list[dict]:
    """40 images whose corners are bright for one class and dark for the other; the centre is noise for both."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        label = i % 2
        pixels = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        bright = bool(label) != dark_is_malignant
        pixels[corner_mask(32, 32)] = 200 + rng.integers(0, 40) if bright else 20 + rng.integers(0, 40)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        records.append({"path": str(tmp_path / f"{i}.png"), "label": label})
    return records


def corner_ensemble(tmp_path: Path, sign: float) -> Ensemble:
    preprocess = {"image_size": 32, "resize": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3,
                  "std": [0.5] * 3}
    return Ensemble([CornerReader(sign).eval()], [tmp_path / "best.pt"], {}, preprocess, {}, "0.5", [1.0], {})


def test_occlusion_test_catches_a_model_that_reads_the_corners(tmp_path: Path) -> None:
    records = corner_images(tmp_path, dark_is_malignant=False)  # malignant images have bright corners
    result = occlusion_test(corner_ensemble(tmp_path, 1.0), pd.DataFrame(records), CPU, n_resamples=200,
                            num_workers=0)
    assert result["auc"]["none"] == 1.0 and result["auc"]["centre"] == 1.0  # the centre never mattered
    assert result["auc"]["corners"] == 0.5  # hidden corners: every image scores the same
    assert result["difference"]["corners"]["difference"]["value"] == -0.5
    assert result["difference"]["corners"]["difference"]["ci"][1] < 0
    assert "corners hidden 0.500 (-0.500" in occlusion_summary(result)
    assert "costs 0.500 AUC" in shortcut_warning(result) and result["corner_area"] == pytest.approx(0.215, abs=0.02)
    result["difference"]["corners"]["difference"] = {"value": -0.01, "ci": [-0.03, 0.01]}
    assert result["auc"]["vignette"] == 0.5  # black corners on every image: every image scores the same
    assert result["vignette_shift"]["value"] < 0  # ... low, as this model reads dark corners as benign
    assert shortcut_warning(result) is None  # a loss inside the CI is no finding, nor a vignette that lowers p


def test_occlusion_test_catches_a_model_that_takes_a_vignette_for_melanoma(tmp_path: Path) -> None:
    records = corner_images(tmp_path, dark_is_malignant=True)  # as in dermoscopy archives: vignettes on melanomas
    result = occlusion_test(corner_ensemble(tmp_path, -1.0), pd.DataFrame(records), CPU, n_resamples=200,
                            num_workers=0)
    assert result["auc"]["none"] == 1.0 and result["auc"]["vignette"] == 0.5
    benign = result["mean_prob"]["none"]["benign"]
    assert benign < 0.01 and result["mean_prob"]["vignette"]["benign"] > 0.99  # black corners: called malignant
    assert result["vignette_shift"]["value"] == pytest.approx(result["mean_prob"]["vignette"]["benign"] - benign)
    assert result["vignette_shift"]["ci"][0] > 0.9
    assert "a black vignette raises benign images' mean probability by 0.99" in shortcut_warning(result)
    assert "a vignette moves benign images' mean probability 0.00" in occlusion_summary(result)


def test_bad_arguments_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"input=.*missing does not exist; point it at an image or a folder"):
        explain(tmp_path / "no_run", CPU, input=tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"n=0 must be an integer >= 1"):
        explain(tmp_path / "no_run", CPU, n=0)
    with pytest.raises(ConfigError, match=r"split='val' is not one of test, train, all"):
        explain(tmp_path / "no_run", CPU, split="val")
    assert make_config(["ckpt=x"], "explain").n == 4  # the config composes, keys as the kwargs


@pytest.mark.slow  # two CLI processes: the slow tier
def test_the_clis_write_only_where_they_say(run_dir: Path, tiny_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """melanoma-explain keeps its .hydra/ and log next to its maps; a bad path leaves no folder (#14, 11b/c)."""
    def cli(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"melanoma.cli.{module}", *args, "trainer.device=cpu"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    done = cli("explain", f"ckpt={run_dir}", "n=2")
    assert done.returncode == 0, done.stderr
    assert {"activation_maps.png", "explain.csv", "explain.log", ".hydra"} <= {p.name for p in
                                                                                (run_dir / "explain").iterdir()}
    assert not (tmp_path / "outputs").exists()  # no empty outputs/explain/<date>/ any more
    scored = cli("predict", f"ckpt={run_dir}", f"input={tiny_data / 'test' / 'benign'}", "num_workers=0")
    assert scored.returncode == 0, scored.stderr
    (log,) = (tmp_path / "outputs" / "predict").glob("*/predict.log")
    assert "10 images scored (0 unreadable skipped)" in log.read_text()  # the log says what the folder holds
    shutil.rmtree(tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    for module, args in [("explain", [f"ckpt={tmp_path / 'typo'}"]), ("evaluate", [f"ckpt={tmp_path / 'typo'}"]),
                         ("predict", [f"ckpt={run_dir}", f"input={tmp_path / 'typo.jpg'}"])]:
        monkeypatch.setattr(sys, "argv", [f"melanoma-{module}", *args])
        with pytest.raises(SystemExit) as refused:  # before Hydra starts: no subprocess needed
            importlib.import_module(f"melanoma.cli.{module}").main()
        err = capsys.readouterr().err
        assert refused.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "typo" in err and "does not exist" in err
    assert list(tmp_path.iterdir()) == []  # nothing written for a mistake in a path
