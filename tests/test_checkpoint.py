"""Atomic files and safe checkpoint loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from melanoma.checkpoint import atomic_path, load_checkpoint, save_checkpoint, write_json
from melanoma.errors import WeightsError


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json({"a": 1}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    save_checkpoint(tmp_path / "best.pt", model, {"model": {"name": "x"}}, epoch=4, metrics={"auc": 0.9}, fold=2)
    payload = load_checkpoint(tmp_path / "best.pt")
    assert payload["epoch"] == 4 and payload["fold"] == 2 and payload["config"]["model"]["name"] == "x"
    assert torch.equal(payload["model"]["weight"], model.weight.detach())


def test_bad_checkpoints_get_one_line(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "ok.pt", torch.nn.Linear(30, 30), {}, 1, {})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a melanoma checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"model": {}, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(WeightsError, match="format 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    write_json({"a": 1}, tmp_path / "m.json")
    save_checkpoint(tmp_path / "c.pt", torch.nn.Linear(2, 1), {}, 1, {})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("m.json", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
