"""``melanoma-bench``: where the time of a training run goes, in images per second.

One process, one model, measured the same way:

(a) ``model_step``: forward, backward and optimizer step on a batch already on the device
    (timed first and again last; the mean is reported);
(b) ``train_loop``: the real training loop from a JPEG folder through the configured data
    pipeline (decode-once cache, workers, augmentation);
(c) ``eval_loop``: validation (no gradients, the larger eval batch) through the same pipeline;
(d) ``timm_loader``: the same loop fed by ``timm.data.create_loader`` over the same images.

The ratio (b)/(a) says how much of the accelerator the data pipeline leaves idle: 1.0 means
loading is entirely hidden behind compute.

    melanoma-bench                                    # ~1 min on a 2-core CPU (generated JPEGs)
    melanoma-bench data.root=/data/melanoma model=efficientnet_b0 data.image_size=224 data.batch_size=64
    melanoma-bench experiment=bench_smoke             # seconds: CI checks the command works
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from itertools import islice
from pathlib import Path

import hydra
import timm
import torch
import torchvision
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from melanoma.cache import build_cache
from melanoma.checkpoint import write_json
from melanoma.cli import check_overrides
from melanoma.data import ImageDataset, load_records, make_loader, resolve_num_workers, split_records, usable_cores
from melanoma.engine import evaluate, make_loss, train_one_epoch
from melanoma.errors import ConfigError, report_user_errors
from melanoma.models import create_model, model_data_config
from melanoma.optim import create_optimizer
from melanoma.runtime import Runtime, resolve_runtime, seed_everything
from melanoma.synthetic import generate_dataset
from melanoma.transforms import Preprocess, build_pipeline, resolve_preprocess, split_augmentation

log = logging.getLogger("melanoma.bench")


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def _timed(fn, runtime: Runtime) -> float:
    """Seconds ``fn()`` takes, with the device's queued work finished before and after."""
    _sync(runtime)
    start = time.perf_counter()
    fn()
    _sync(runtime)
    return time.perf_counter() - start


def machine_info(runtime: Runtime) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux: the marketing name of the CPU
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info = {"host": platform.node(), "platform": platform.platform(), "cpu": cpu, "usable_cores": usable_cores(),
            "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "device": str(runtime.device)}
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


def run_benchmark(cfg: DictConfig, out_dir: Path) -> dict:
    """Measure (a)-(d) for the configured model and data, print them and write ``benchmark.json``.

    Returns:
        The content of ``benchmark.json``.
    """
    b, d, m = cfg.bench, cfg.data, cfg.model
    if b.steps < 1 or b.warmup < 1:
        raise ConfigError(f"bench.steps={b.steps} and bench.warmup={b.warmup} must both be at least 1")
    runtime = resolve_runtime(cfg.trainer.device, cfg.trainer.precision, cfg.trainer.channels_last, d.image_size)
    seed_everything(cfg.seed)
    if d.synthetic:
        generate_dataset(d.root, **d.synthetic)
    classes = tuple(d.classes)
    train_set = split_records(load_records(d.layout, d.root, classes, d.manifest), "train", classes)
    workers = resolve_num_workers(d.num_workers)
    need = (b.warmup + b.steps) * d.batch_size
    if len(train_set) < need:
        raise ConfigError(f"bench needs (bench.warmup + bench.steps) x data.batch_size = {need} training images; "
                          f"{d.root} has {len(train_set)}: lower bench.steps or use a larger set")
    # The workers start together, so their first batches arrive in one burst that even a loader-bound
    # loop eats at the model's speed: two rounds of worker batches go by before the timer starts,
    # as far as the images allow.
    loop_warmup = min(max(b.warmup, 2 * workers), len(train_set) // d.batch_size - b.steps)
    if loop_warmup < 2 * workers:
        log.warning("the loops warm up for %d batches, fewer than two rounds of %d workers: the timed loop may "
                    "include their first burst; use a larger set or fewer data.num_workers", loop_warmup, workers)
    need = (loop_warmup + b.steps) * d.batch_size
    eval_batch = d.eval_batch_size or 2 * d.batch_size
    if eval_batch > need:
        raise ConfigError(f"data.eval_batch_size={eval_batch} is more than the {need} images the benchmark uses; "
                          "lower data.eval_batch_size or raise bench.steps")
    train_set = train_set.sample(n=need, random_state=cfg.seed).reset_index(drop=True)
    paths, labels = train_set["path"].tolist(), train_set["label"].tolist()

    model = create_model(m.name, False, None).to(runtime.device, memory_format=runtime.memory_format)
    aug = OmegaConf.to_container(cfg.augmentation, resolve=True)
    size, batch = d.image_size, d.batch_size
    overrides, recipe = split_augmentation(aug)
    pipeline = build_pipeline(resolve_preprocess(size, model_data_config(model), **overrides), **recipe)
    if cfg.trainer.compile:
        model = torch.compile(model)
    optimizer = create_optimizer(model, cfg.optimizer.name, cfg.optimizer.lr, fused=runtime.device.type == "cuda")
    loss_fn, scaler = make_loss(None).to(runtime.device), runtime.grad_scaler()
    results: dict = {}

    # (a) the model alone: one batch, already on the device.
    x = torch.randn(batch, 3, size, size, device=runtime.device).contiguous(memory_format=runtime.memory_format)
    y = torch.randint(0, 2, (batch,), device=runtime.device).float()
    train_one_epoch(model, [(x, y)] * b.warmup, optimizer, loss_fn, runtime, scaler, desc="warmup")

    def model_rate() -> float:
        seconds = _timed(lambda: train_one_epoch(model, [(x, y)] * b.steps, optimizer, loss_fn, runtime, scaler,
                                                 desc="model step"), runtime)
        return b.steps * batch / seconds

    # Timed first and again last: the mean cancels drift over the run (warming allocators, clocks).
    model_step_runs = [model_rate()]

    # (b) the training loop through the configured pipeline, (c) validation through it.
    start = time.perf_counter()
    decoded = build_cache(paths, d.cache_edge or pipeline.preprocess.resize, d.cache, d.cache_dir,
                          interpolation=pipeline.preprocess.interpolation)
    results["cache_build_seconds"] = time.perf_counter() - start
    pin = runtime.device.type == "cuda"
    loader = make_loader(ImageDataset(paths, labels, pipeline.train, decoded), batch, train=True,
                         num_workers=workers, seed=cfg.seed, pin_memory=pin, prefetch_factor=d.prefetch_factor)
    results["train_loop"] = _loop_rate(loader, loop_warmup, b.steps, batch, lambda batches: train_one_epoch(
        model, batches, optimizer, loss_fn, runtime, scaler, desc="train loop", device_transform=pipeline.device),
        runtime)
    eval_loader = make_loader(ImageDataset(paths, labels, pipeline.eval, decoded), eval_batch, train=False,
                              num_workers=workers, seed=cfg.seed, pin_memory=pin, prefetch_factor=d.prefetch_factor)
    n_eval = (need // eval_batch) * eval_batch
    evaluate(model, islice(eval_loader, max(1, b.warmup // 2)), loss_fn, runtime, desc="warmup")
    seconds = _timed(lambda: evaluate(model, islice(eval_loader, need // eval_batch), loss_fn, runtime,
                                      desc="eval loop"), runtime)
    results["eval_loop"] = n_eval / seconds

    # (d) the same loop fed by timm's loader over the same images and batch size.
    if b.timm_loader:
        pre = pipeline.preprocess
        results["timm_loader"] = _loop_rate(_timm_loader(paths, classes, size, batch, workers, pre, aug, runtime),
                                            loop_warmup, b.steps, batch,
                                            lambda batches: train_one_epoch(model, batches, optimizer, loss_fn,
                                                                            runtime, scaler, desc="timm loader"),
                                            runtime)
    model_step_runs.append(model_rate())
    results["model_step"] = sum(model_step_runs) / 2
    report = {
        "machine": machine_info(runtime),
        "model": m.name, "image_size": size, "batch_size": batch, "eval_batch_size": eval_batch,
        "precision": runtime.precision, "channels_last": runtime.channels_last, "compile": bool(cfg.trainer.compile),
        "num_workers": workers, "cache": d.cache, "augmentation": cfg.augmentation.name,
        "augmentation_on_device": pipeline.device is not None, "data": str(d.root),
        "n_images": need, "warmup_steps": b.warmup, "loop_warmup_steps": loop_warmup, "timed_steps": b.steps,
        "images_per_second": {k: round(results[k], 2) for k in ("model_step", "train_loop", "eval_loop",
                                                                 "timm_loader") if k in results},
        "model_step_first_and_last": [round(v, 2) for v in model_step_runs],
        "cache_build_seconds": round(results["cache_build_seconds"], 3),
        "ratio_train_loop_to_model_step": round(results["train_loop"] / results["model_step"], 4),
    }
    if "timm_loader" in results:
        report["ratio_train_loop_to_timm_loader"] = round(results["train_loop"] / results["timm_loader"], 4)
    write_json(report, out_dir / "benchmark.json")
    _print(report, out_dir)
    return report


def _loop_rate(loader, warmup: int, steps: int, batch: int, run, runtime: Runtime) -> float:
    """Images/s of ``run`` over ``steps`` batches, after ``warmup`` batches that start the workers."""
    batches = iter(loader)
    run(islice(batches, warmup))
    seconds = _timed(lambda: run(islice(batches, steps)), runtime)
    return steps * batch / seconds


def _timm_loader(paths: list[str], classes: tuple[str, str], size: int, batch: int, workers: int,
                 pre: Preprocess, aug: dict, runtime: Runtime):
    """``timm.data.create_loader`` over the same files, with the closest augmentation timm offers.

    timm has no small-angle rotation, so this side does slightly less work per image than ours.
    """
    dataset = timm.data.ImageDataset(str(Path(paths[0]).parents[1]))
    wanted = {str(Path(p).resolve()) for p in paths}
    dataset.reader.samples = [s for s in dataset.reader.samples if str(Path(s[0]).resolve()) in wanted]
    if len(dataset) != len(paths) or dataset.reader.class_to_idx != {classes[0]: 0, classes[1]: 1}:
        raise ConfigError("bench.timm_loader=true needs a class-folder layout (data=kaggle or data=folder with "
                          "benign/ and malignant/); set bench.timm_loader=false for other data")
    jitter = tuple(aug["color_jitter"]) if aug.get("augment", True) and aug["color_jitter"] else 0.0
    loader = timm.data.create_loader(
        dataset, input_size=(3, size, size), batch_size=batch, is_training=True, no_aug=not aug.get("augment", True),
        scale=tuple(aug["scale"]), hflip=aug["hflip"], vflip=aug["vflip"], color_jitter=jitter, mean=pre.mean,
        std=pre.std, interpolation=pre.interpolation, crop_pct=pre.crop_pct, num_workers=workers,
        pin_memory=runtime.device.type == "cuda", device=runtime.device,
        use_prefetcher=runtime.device.type == "cuda", persistent_workers=workers > 0)
    return ((images.to(runtime.device), targets.float()) for images, targets in loader)


def _print(report: dict, out_dir: Path) -> None:
    ips = report["images_per_second"]
    print(f"\n{report['model']} at {report['image_size']} px, batch {report['batch_size']}, {report['precision']}, "
          f"{report['num_workers']} workers, cache={report['cache']}, augmentation on "
          f"{'the device' if report['augmentation_on_device'] else 'the workers'}, on {report['machine']['device']}:")
    for name, value in ips.items():
        print(f"  {name:<12} {value:10.1f} images/s")
    print(f"  train loop / model step = {report['ratio_train_loop_to_model_step']:.3f}"
          + (f"; train loop / timm loader = {report['ratio_train_loop_to_timm_loader']:.3f}"
             if "ratio_train_loop_to_timm_loader" in report else ""))
    print(f"  decoding once took {report['cache_build_seconds']:.1f} s; {out_dir / 'benchmark.json'}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    report_user_errors("melanoma-bench", run_benchmark, cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console entry point ``melanoma-bench``."""
    check_overrides("melanoma-bench", "bench")
    _hydra_main()


if __name__ == "__main__":
    main()
