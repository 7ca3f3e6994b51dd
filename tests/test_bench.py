"""melanoma-bench: the smoke mode runs the real command and writes a complete, consistent JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from melanoma.cli.bench import run_benchmark
from melanoma.errors import ConfigError

from conftest import make_config


@pytest.mark.slow  # a benchmark in a CLI process: the slow tier
def test_smoke_benchmark_writes_valid_json(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("melanoma-bench")
    done = subprocess.run([str(exe), "experiment=bench_smoke", f"data.root={tmp_path / 'jpegs'}",
                           f"hydra.run.dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    ips = report["images_per_second"]
    assert list(ips) == ["model_step", "train_loop", "eval_loop", "timm_loader"]
    assert ips["model_step"] == pytest.approx(sum(report["model_step_first_and_last"]) / 2, abs=0.02)
    assert all(v > 0 for v in ips.values())
    assert report["ratio_train_loop_to_model_step"] == pytest.approx(ips["train_loop"] / ips["model_step"], rel=1e-3)
    assert report["ratio_train_loop_to_timm_loader"] == pytest.approx(ips["train_loop"] / ips["timm_loader"],
                                                                      rel=1e-3)
    assert (report["model"], report["image_size"], report["batch_size"], report["cache"]) == \
        ("test_efficientnet", 32, 8, "memory")
    assert report["augmentation_on_device"] is False
    assert report["loop_warmup_steps"] == 2 * report["num_workers"] == 2  # the first round of worker batches
    assert report["n_images"] == (2 + 2) * 8 and report["machine"]["torch"] and report["machine"]["usable_cores"] >= 1
    assert "train loop / model step" in done.stdout


def test_too_few_images_names_the_keys(tmp_path: Path) -> None:
    cfg = make_config(["experiment=bench_smoke", f"data.root={tmp_path / 'jpegs'}", "bench.steps=50"], "bench")
    with pytest.raises(ConfigError, match=r"bench.steps"):
        run_benchmark(cfg, tmp_path / "out")
    cfg = make_config(["experiment=bench_smoke", f"data.root={tmp_path / 'jpegs'}", "data.eval_batch_size=64"],
                      "bench")
    with pytest.raises(ConfigError, match=r"data.eval_batch_size=64 is more than the 32 images"):
        run_benchmark(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "benchmark.json").exists()


def test_loop_warmup_covers_two_rounds_of_workers_as_far_as_the_images_allow(tmp_path: Path) -> None:
    # 40 images in batches of 8: 5 batches, 2 of them timed; two rounds of 2 workers would need 4
    cfg = make_config(["experiment=bench_smoke", f"data.root={tmp_path / 'jpegs'}", "data.num_workers=2",
                       "bench.timm_loader=false"], "bench")
    report = run_benchmark(cfg, tmp_path / "out")
    assert (report["num_workers"], report["loop_warmup_steps"], report["n_images"]) == (2, 3, 40)
