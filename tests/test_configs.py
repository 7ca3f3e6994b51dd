"""Config layer: every option of every group composes, and the keys docs rely on exist."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from melanoma.cli.schema import problems

from conftest import make_config

CONFIGS = resources.files("melanoma.configs")
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))
OPTIONS = [(g, p.name.removesuffix(".yaml")) for g in GROUPS for p in sorted(CONFIGS.joinpath(g).iterdir())
           if p.name.endswith(".yaml")]
DOCUMENTED_KEYS = ["data.root", "data.image_size", "data.batch_size", "data.num_workers", "trainer.epochs",
                   "trainer.device", "trainer.precision", "model.name", "model.pretrained", "model.weights",
                   "optimizer.lr", "cv.folds", "seed"]


def test_groups_are_the_documented_ones() -> None:
    assert set(GROUPS) == {"audit", "augmentation", "cv", "data", "experiment", "hparams", "hydra", "logger", "model",
                           "optimizer", "recipe", "runtime", "scheduler", "trainer"}
    assert {o for g, o in OPTIONS if g == "logger"} == {"none", "csv", "tensorboard", "mlflow", "wandb"}
    assert {o for g, o in OPTIONS if g == "hparams"} == {"seed_grid", "optuna"}
    assert {o for g, o in OPTIONS if g == "model"} == {"resnet34", "resnext101", "mobilenet_v2", "efficientnet_b0",
                                                      "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert {o for g, o in OPTIONS if g == "recipe"} == {"finetune", "seed"}


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes(group: str, option: str) -> None:
    extra = {"csv": ["data.manifest=m.csv"], "folder": ["data.root=/x"]}.get(option, [])
    cfg = make_config([f"{group}={option}", *extra])
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for key in DOCUMENTED_KEYS:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
    assert container["model"]["name"]
    if (group, option) != ("experiment", "bench_smoke"):  # melanoma-bench's preset: checked below
        assert problems(container, "train") == []  # every shipped option fits the schema


@pytest.mark.parametrize(("config", "argv"), [
    ("eval", ["ckpt=RUN"]), ("eval", ["ckpt=RUN", "data=csv", "data.manifest=m.csv"]), ("explain", ["ckpt=RUN"]),
    ("predict", ["ckpt=RUN", "input=x.jpg"]), ("audit_run", []), ("bench", []), ("bench", ["experiment=bench_smoke"]),
    ("export", ["ckpt=RUN"]),
])
def test_every_cli_default_fits_its_schema(config: str, argv: list[str]) -> None:
    from hydra import compose, initialize_config_module

    with initialize_config_module("melanoma.configs", version_base="1.3"):
        cfg = compose(config, overrides=argv)
    assert problems(OmegaConf.to_container(cfg, resolve=True), config) == []


# Values the schema (cli/schema.py) refuses: each is one line before anything runs.
SCHEMA_ERRORS = [
    ("train", ["cv.oof_tta=[flip,d8]"], r"^cv.oof_tta=\['flip', 'd8'\] must be a list of TTA modes from flip, d4"),
    ("train", ["data.batch_size=abc"], r"^data.batch_size='abc' must be an integer >= 1 \(see melanoma-x --help\)$"),
    ("train", ["+trainer.epoch=3"], r"^trainer.epoch is not a key of trainer \(close: epochs\); the keys are epochs,"),
    ("train", ["+optimizer.learning_rate=0.1"], r"optimizer.learning_rate is not a key of optimizer .*are name, lr,"),
    ("train", ["+foo=1"], r"^foo is not a top-level key \(close: none\); the keys are seed, resume, data,"),
    ("train", ["optimizer.lr=-1", "trainer.epochs=0"],
     r"^optimizer.lr=-1 must be a number > 0 \(and 1 more: trainer.epochs=0 must be an integer >= 1\)"),
    ("train", ["trainer.monitor=acc"], r"trainer.monitor='acc' must be one of auc, loss, accuracy, f1, balanced_acc"),
    ("train", ["optimizer.name=rmsprop"], r"optimizer.name='rmsprop' must be one of adam, adamw, sgd, momentum"),
    ("train", ["cv.operating_point=sens90"], r"cv.operating_point='sens90' must be one of 0.5, youden, sens95"),
    ("train", ["trainer.pos_weight=-2"], r"trainer.pos_weight=-2 must be null or one of auto or a number > 0"),
    ("train", ["data.sampler=oversample"], r"data.sampler='oversample' must be one of shuffle, balanced"),
    ("train", ["data.sampler=balanced", "trainer.pos_weight=auto"],
     r"^data.sampler=balanced and trainer.pos_weight=auto both correct the class imbalance; keep one"),
    ("train", ["augmentation.scale=[0.9,0.2]"], r"augmentation.scale=\[0.9, 0.2\] must be a list \[min, max\]"),
    ("train", ["augmentation.vignette_radius=[1.3,0.8]"],
     r"augmentation.vignette_radius=\[1.3, 0.8\] must be a list \[min, max\] of radii in half-sides"),
    ("train", ["augmentation.color_jitter=[0.2,0.2]"], r"color_jitter=\[0.2, 0.2\] must be a list of 4 numbers >= 0"),
    ("train", ["trainer.compile=maybe"], r"trainer.compile='maybe' must be true or false"),
    ("train", ["audit.threshold=200"], r"audit.threshold=200 must be an integer in \[0, 143\]"),
    ("train", ["data=synthetic", "data.synthetic.n_train=x"], r"data.synthetic.n_train='x' must be an integer >= 4"),
    ("train", ["cv.seed=${nope}"], r"^cv.seed: Interpolation key 'nope' not found; check the overrides$"),
    ("eval", ["ckpt=RUN", "eval.n_resamples=many"], r"eval.n_resamples='many' must be an integer >= 0"),
    ("eval", ["ckpt=RUN", "eval.threshold=2"], r"eval.threshold=2 must be one of youden, sens95 or a number in \[0, 1"),
    ("eval", ["ckpt=RUN", "data.on_bad_file=ignore"], r"data.on_bad_file='ignore' must be one of error, skip or null"),
    ("predict", ["ckpt=RUN", "input=x.jpg", "batch_size=0"], r"^batch_size=0 must be an integer >= 1"),
    ("predict", ["ckpt=RUN", "input=x.jpg", "tta=d8"], r"^tta='d8' must be one of none, flip, d4"),
    ("explain", ["ckpt=RUN", "n=abc"], r"^n='abc' must be an integer >= 1"),
    ("audit_run", ["audit.workers=0"], r"^audit.workers=0 must be an integer >= 1 or null"),
    ("bench", ["bench.steps=x"], r"^bench.steps='x' must be an integer >= 1"),
    ("bench", ["-m", "data.batch_size=16,abc"], r"^data.batch_size='abc' must be"),  # any value of a sweep
]


def test_a_bad_value_leaves_no_run_folder(tmp_path: Path) -> None:
    """``data.batch_size=abc`` used to be a TypeError after folds.csv was written."""
    result = subprocess.run([sys.executable, "-m", "melanoma.cli.train", "data=demo", "data.batch_size=abc"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("melanoma-train: error: data.batch_size='abc' must be an integer >= 1 "
                                     "(see melanoma-train --help)")
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, no .hydra/, no log


def test_model_names_are_timm_names() -> None:
    import timm

    expected = {"resnet34": "resnet34", "resnext101": "resnext101_32x8d", "mobilenet_v2": "mobilenetv2_100",
                "efficientnet_b0": "efficientnet_b0", "efficientnet_lite0": "tf_efficientnet_lite0",
                "efficientnet_lite1": "tf_efficientnet_lite1", "efficientnet_lite2": "tf_efficientnet_lite2"}
    for option, name in expected.items():
        cfg = make_config([f"model={option}"])
        assert cfg.model.name == name and timm.is_model(name)
        assert cfg.model.pretrained is True and cfg.model.weights is None


def test_seed_recipe_matches_the_seed() -> None:
    cfg = make_config(["recipe=seed"])
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.optimizer.name, cfg.optimizer.lr) == (224, 64, "adam", 0.001)
    assert (cfg.trainer.epochs, cfg.cv.folds, cfg.trainer.monitor) == (25, 3, "auc")
    assert cfg.scheduler.name == "none" and cfg.optimizer.layer_decay is None and cfg.trainer.ema_decay is None
    assert cfg.augmentation.name == "seed" and cfg.augmentation.rotation == 15 and cfg.augmentation.hflip == 0.5
    assert cfg.augmentation.color_jitter == [0.2, 0.2, 0.2, 0.02] and cfg.trainer.clip_grad_norm is None
    grid = make_config(["hparams=seed_grid"])  # the coursework's grid keeps the coursework's recipe
    assert (grid.optimizer.name, grid.scheduler.name, grid.augmentation.name) == ("adam", "none", "seed")


def test_pretrained_backbones_fine_tune_by_default() -> None:
    cfg = make_config(["model=efficientnet_b0"])
    assert cfg.model.pretrained is True
    assert (cfg.optimizer.name, cfg.scheduler.name, cfg.augmentation.name) == ("adamw", "warmup_cosine", "dermoscopy")
    assert 0 < cfg.optimizer.layer_decay < 1 and cfg.scheduler.warmup_epochs > 0
    assert cfg.cv.calibration == "temperature"


def test_unknown_option_lists_the_choices() -> None:
    with pytest.raises(MissingConfigException, match="efficientnet_b0"):
        make_config(["model=vgg_nonexistent"])
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="adam"):
        make_config(["optimizer=lion_nonexistent"])


def test_seed_grid_is_a_multirun_over_lr_and_batch() -> None:
    make_config(["hparams=seed_grid"])  # composes
    grid = OmegaConf.create(CONFIGS.joinpath("hparams/seed_grid.yaml").read_text())
    assert grid.hydra.mode == "MULTIRUN"
    assert grid.hydra.sweeper.params["optimizer.lr"] == "0.001,0.01,0.1"
    assert grid.hydra.sweeper.params["data.batch_size"] == "16,32,64"


@pytest.mark.parametrize(("launcher", "target", "values"), [
    ("joblib", "JoblibLauncher", {}),
    ("parallel", "JoblibLauncher", {"n_jobs": 2}),
    ("submitit_slurm", "SlurmLauncher", {}),
    ("slurm", "SlurmLauncher", {"gpus_per_node": 1, "timeout_min": 120, "partition": "gpu-a"}),
])
def test_launcher_configs_compose(launcher: str, target: str, values: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import get_class

    monkeypatch.setenv("SLURM_PARTITION", "gpu-a")
    with initialize_config_module(config_module="melanoma.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "hparams=seed_grid"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    get_class(cfg.hydra.launcher._target_)  # the plugin is installed, not just named
    for key, value in values.items():
        assert cfg.hydra.launcher[key] == value
    assert cfg.hydra.sweeper.params["optimizer.lr"] == "0.001,0.01,0.1"


def test_demo_experiment_is_offline_on_the_shipped_real_set() -> None:
    cfg = make_config(["experiment=demo"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert cfg.model.weights == "lite0-package" and cfg.model.name == "tf_efficientnet_lite0"
    assert data["layout"] == "csv" and data["synthetic"] is None
    manifest = Path(data["manifest"])
    assert manifest.is_file() and (manifest.parent / "ATTRIBUTION.txt").is_file()
    assert manifest.parent.parent.parent == Path(resources.files("melanoma"))  # inside the package


@pytest.mark.slow  # builds the wheel: the slow tier (scripts/test.sh -m slow)
def test_configs_ship_in_the_wheel(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True)
    (wheel,) = tmp_path.glob("melanoma-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for group, option in OPTIONS:
        assert f"melanoma/configs/{group}/{option}.yaml" in names
    for top in ("train", "eval", "predict", "audit_run", "explain", "export", "bench"):
        assert f"melanoma/configs/{top}.yaml" in names
    assert "melanoma/configs/__init__.py" in names
    demo = "melanoma/demo_data/isic-uda1"
    assert {f"{demo}/manifest.csv", f"{demo}/ATTRIBUTION.txt"} <= names
    assert sum(n.startswith(f"{demo}/images/") and n.endswith(".jpg") for n in names) == 557
    assert {"melanoma/configs/hydra/launcher/slurm.yaml", "melanoma/configs/hydra/launcher/parallel.yaml"} <= names


TRAIN_GROUPS = {"audit", "augmentation", "cv", "data", "experiment", "hparams", "logger", "model", "optimizer",
                "recipe", "runtime", "scheduler", "trainer"}
HELP_GROUPS = {"train": TRAIN_GROUPS, "eval": {"audit", "data", "runtime"}, "predict": {"runtime"},
               "explain": {"runtime"}, "export": set(), "audit": {"audit", "cv", "data"},
               "bench": {"augmentation", "data", "experiment", "model", "optimizer", "runtime", "trainer"}}


@pytest.mark.parametrize(("command", "module"), [("train", "train"), ("eval", "evaluate"), ("predict", "predict"),
                                               ("explain", "explain"), ("export", "export"), ("audit", "audit"),
                                               ("bench", "bench")])
def test_help_starts_with_what_the_command_does(command: str, module: str, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"melanoma-{command}", "--help"])  # in-process: what the console script runs
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"melanoma.cli.{module}").main()
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith(f"melanoma-{command}: ") and "powered by Hydra" not in text
    assert text.index("Examples:") < text.index("== Configuration groups ==") < text.index("== Config ==")
    assert text.count(f"melanoma-{command} ") >= 2  # at least two example command lines
    section = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {line.split(":")[0] for line in section.splitlines()[3:] if ":" in line and not line.startswith("(")}
    assert listed == HELP_GROUPS[command]  # only the groups the command takes, not every group of the tree
    assert "model: efficientnet_b0, efficientnet_lite0" in section if "model" in listed else "model:" not in section


@pytest.mark.parametrize(("config", "argv", "message"), [
    ("train", ["model=efficientnetb0"], r"model=efficientnetb0 is not an option of model \(close: efficientnet_b0.*\); "
                                        r"the options are efficientnet_b0, .*resnext101$"),
    ("train", ["trainer.epoch=3"], r"trainer.epoch is not a key of trainer \(close: epochs\); the keys are .*epochs"),
    ("train", ["augmentaton.vignette=0.5"],  # a typo in the group names the group, not its key
     r"^augmentaton is not a top-level key \(close: augmentation\); the keys are seed, resume, data,"),
    ("predict", ["ckpt=RUN", "input=x.jpg", "modle.name=resnet34"], r"^modle is not a top-level key \(close: none"),
    ("train", ["data.root.x=1"], r"^data.root is a value, not a group of keys: set data.root=VALUE, not data.root.x$"),
    ("train", ["-m", "optimizer.lr=0.1,0.01", "model=resnet34,efficientnetb0"],  # the second value of a sweep
     r"model=efficientnetb0 is not an option of model"),
    ("train", ["optimizer.lr=0.1,0.01"], r"Ambiguous value for argument 'optimizer.lr=0.1,0.01'; .*--multirun"),
    ("train", ["data.root"], r"Error parsing override 'data.root'; missing EQUAL"),
    ("eval", [], r"ckpt is required: pass ckpt=RUN_DIR \(a melanoma-train run folder\) or .*best.pt"),
    ("predict", ["ckpt=RUN"], r"input is required: pass input=IMAGE_OR_FOLDER"),
    *SCHEMA_ERRORS,
])
def test_hydras_own_errors_are_one_line_and_exit_2(config: str, argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    from melanoma.cli import check_overrides

    with pytest.raises(SystemExit) as exit_info:
        check_overrides("melanoma-x", config, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("melanoma-x: error: ")
    assert re.search(message, err.strip().removeprefix("melanoma-x: error: ")), err


@pytest.mark.parametrize("argv", [["experiment=demo", "hydra.run.dir=/tmp/x"], ["hparams=seed_grid"],
                                  ["-m", "hydra/launcher=parallel", "model=resnet34,resnext101,mobilenet_v2"],
                                  ["--cfg", "job", "model=whatever"]])  # Hydra flags: left to Hydra
def test_valid_command_lines_pass_the_check(argv: list[str]) -> None:
    from melanoma.cli import check_overrides

    check_overrides("melanoma-train", "train", argv)
