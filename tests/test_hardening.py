"""Mistakes a user can make (#14): each is one line naming the file or key and the fix, and nothing is lost."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import melanoma.crossval as crossval
from melanoma.cache import decode_resized
from melanoma.checkpoint import load_checkpoint, run_lock, save_checkpoint, write_json
from melanoma.cli.train import train
from melanoma.crossval import load_training_set
from melanoma.data import DEMO_DATA, load_records, scan_images
from melanoma.errors import ConfigError, DataError, NonFiniteLossError, WeightsError, report_user_errors
from melanoma.models import create_model

from conftest import TINY, make_config


def _manifest(tmp_path: Path, tiny_data: Path, extra: list[str]) -> Path:
    """A CSV manifest of the tiny set's training images, plus ``extra`` lines."""
    records = load_records("kaggle", tiny_data)
    lines = ["path,label,split", *[f"{r.path},{r.label},{r.split}" for r in records.itertuples()], *extra]
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_audit_applies_on_bad_file_to_a_missing_file(tiny_data: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.jpg"
    manifest = _manifest(tmp_path, tiny_data, [f"{missing},1,train"])
    kept = load_training_set("csv", None, ("benign", "malignant"), manifest, on_bad_file="skip", audit_workers=1)
    assert len(kept.records) == 150 and kept.skipped == [(str(missing), kept.skipped[0][1])]
    assert kept.skipped[0][1].startswith("FileNotFoundError")
    assert kept.summary["unreadable"] == [{"path": str(missing), "reason": kept.skipped[0][1]}]  # in audit.json
    with pytest.raises(DataError, match=rf"{missing} is not a readable image \(FileNotFoundError.*"
                                        r"data.on_bad_file=skip"):
        load_training_set("csv", None, ("benign", "malignant"), manifest, on_bad_file="error", audit_workers=1)


def _as_user_without_root(uid: int, work: Callable[[], object]) -> object:
    """``work()`` in a forked child that gave up root (root reads files whatever their permissions).

    A fork, not a new interpreter: the interpreter of this venv may sit under a folder that only root can
    read. The child returns its result (or its error as text) through a pipe.
    """
    if os.geteuid() != 0:
        return work()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, do the work, report, exit without running pytest's teardown
        os.close(read_end)
        try:
            os.setgid(uid)
            os.setuid(uid)
            result: object = {"ok": work()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(result, default=str).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(text)
    assert "ok" in result, result["error"]
    return result["ok"]


def test_the_audit_applies_on_bad_file_to_an_unreadable_file(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission for the user: skipped and counted, not a PermissionError traceback.

    The hash cache belongs to root here: the audit warns that it cannot write it, and goes on.
    """
    folder = Path(tempfile.mkdtemp(prefix="melanoma-perm-"))  # not tmp_path: its parents are root's alone
    try:
        images = sorted((tiny_data / "train").rglob("*.jpg"))[::15]
        for k, image in enumerate(images):
            shutil.copy(image, folder / f"{k}.jpg")
        locked = folder / "locked.jpg"
        shutil.copy(images[0], locked)
        rows = [f"{folder / f'{k}.jpg'},{k % 2},train" for k in range(len(images))] + [f"{locked},0,train"]
        (folder / "manifest.csv").write_text("\n".join(["path,label,split", *rows]) + "\n")
        for path in [folder, *folder.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        locked.chmod(0)

        def audit() -> dict:
            warnings: list[str] = []
            handler = logging.Handler()
            handler.emit = lambda record: warnings.append(record.getMessage())
            logging.getLogger("melanoma.audit").addHandler(handler)
            try:
                kept = load_training_set("csv", None, ("benign", "malignant"), folder / "manifest.csv",
                                         on_bad_file="skip", audit_workers=1)
            finally:
                logging.getLogger("melanoma.audit").removeHandler(handler)
            return {"skipped": kept.skipped, "kept": len(kept.records), "unreadable": kept.summary["unreadable"],
                    "warnings": warnings}

        if os.geteuid() != 0:  # no root to own the cache: make it unwritable
            (folder / "cache").mkdir(mode=0o555)
            monkeypatch.setenv("MELANOMA_CACHE", str(folder / "cache"))
        seen = _as_user_without_root(65534, audit)
        assert [path for path, _ in seen["skipped"]] == [str(locked)] and seen["kept"] == len(images)
        assert seen["skipped"][0][1].startswith("PermissionError")
        assert seen["unreadable"][0]["path"] == str(locked)  # in audit.json too
        assert any(w.startswith("audit cache not written") and "MELANOMA_CACHE=FOLDER" in w for w in seen["warnings"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_repeated_manifest_rows_collapse_and_conflicting_labels_are_one_line(
        tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = load_records("kaggle", tiny_data).iloc[0]
    manifest = _manifest(tmp_path, tiny_data, [f"{first.path},{first.label},{first.split}"] * 2)
    with caplog.at_level(logging.WARNING):
        records = load_records("csv", None, manifest=manifest)
    assert len(records) == 170 and records["path"].is_unique
    assert "2 repeated row(s) of the same image, label and split were read once" in caplog.text
    conflicting = _manifest(tmp_path, tiny_data, [f"{first.path},{1 - first.label},{first.split}"])
    with pytest.raises(DataError, match=rf"manifest.csv:172: {first.path} is also on line 2 with label "
                                        rf"{first.label}, split {first.split} \(here label {1 - first.label}"):
        load_records("csv", None, manifest=conflicting)


def test_a_resume_path_that_holds_no_run_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"resume=.*nowhere holds no melanoma-train run \(no folds.csv\)"):
        train(make_config([f"data.root={tiny_data}", *TINY, f"resume={tmp_path / 'nowhere'}"]), tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_missing_data_is_named_before_any_weights_are_fetched(tmp_path: Path) -> None:
    # pretrained=true on a machine without the hub would fail on the weights; the data is checked first
    with pytest.raises(DataError, match=r"data.root=.*nonexistent is not a folder"):
        train(make_config([f"data.root={tmp_path / 'nonexistent'}", "model=efficientnet_b0"]), tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # nothing of a run was written


@pytest.mark.parametrize(("command", "args", "message"), [
    ("train", ["data=folder", "data.root={tmp}/nothere"], r"data.root=.*nothere is not a folder; set data.root=PATH"),
    ("train", ["-m", "data=folder", "data.root={tmp},{tmp}/nothere"], r"data.root=.*nothere is not a folder"),  # sweep
    ("train", ["data=csv", "data.manifest={tmp}/none.csv"], r"data.manifest=.*none.csv does not exist; point it at"),
    ("train", ["data=csv"], r"data=csv needs data.manifest=PATH to a CSV with path,label\[,split\] columns"),
    ("evaluate", ["ckpt={tmp}", "data=csv", "data.manifest={tmp}/none.csv"], r"data.manifest=.*none.csv does not"),
    ("evaluate", ["ckpt={tmp}", "data=folder", "data.root={tmp}/nothere"], r"data.root=.*nothere is not a folder"),
    ("evaluate", ["ckpt={tmp}", "data.root={tmp}/nothere"], r"data.root=.*nothere is not a folder"),  # no data=
])
def test_a_missing_data_path_is_one_line_before_the_output_folder(command: str, args: list[str], message: str,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    if command == "evaluate":  # a run folder that holds checkpoints, so the data is what gets named
        (tmp_path / "fold0").mkdir()
        (tmp_path / "fold0" / "best.pt").write_bytes(b"")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in args] + [f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"]
    monkeypatch.setattr(sys, "argv", [f"melanoma-{command}", *argv])
    with pytest.raises(SystemExit) as refused:
        importlib.import_module(f"melanoma.cli.{command}").main()
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err) and not out.exists()


def test_eval_leaves_generated_data_to_the_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data=synthetic names a cache folder that the evaluation writes itself: not refused for being absent yet."""
    from melanoma.cli.evaluate import _preflight

    monkeypatch.setenv("MELANOMA_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "run" / "fold0").mkdir(parents=True)
    (tmp_path / "run" / "fold0" / "best.pt").write_bytes(b"")
    _preflight(make_config([f"ckpt={tmp_path / 'run'}", "data=synthetic"], "eval"))  # no error
    with pytest.raises(DataError, match=r"data.root=.*nothere is not a folder"):
        _preflight(make_config([f"ckpt={tmp_path / 'run'}", f"data.root={tmp_path / 'nothere'}"], "eval"))


def test_a_run_directory_has_one_owner(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run):  # another run writing there: a separate lock on the same file, as a second process takes
        with pytest.raises(DataError, match=rf"{run} is in use by another run \(PID {os.getpid()}\); wait for it"):
            train(make_config([f"data.root={tiny_data}", *TINY]), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the second writer wrote nothing
    with run_lock(run):  # released when its holder ends: never stale
        pass


def test_refusals_never_suggest_loading_unsafely(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "format_version": 1, "x": Evil()}, tmp_path / "evil.pt")
    torch.save({"weight": Evil()}, tmp_path / "evil_weights.pt")
    for load, match in ((lambda: load_checkpoint(tmp_path / "evil.pt"), "not a loadable checkpoint"),
                        (lambda: create_model("test_resnet", weights=str(tmp_path / "evil_weights.pt")),
                         "cannot be loaded as plain tensors")):
        with pytest.raises(WeightsError, match=match) as info:
            load()
        assert "weights_only" not in str(info.value) and "False" not in str(info.value)
        assert "nothing in it was run" in str(info.value)


def test_a_full_disk_is_one_line_and_keeps_the_last_complete_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(3, 1)
    save_checkpoint(tmp_path / "best.pt", model, {}, 1, {"auc": 0.7})

    def full(*args, **kwargs):  # what torch.save's zip writer raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 96")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DataError, match=rf"no space left to write {tmp_path / 'best.pt'} \(\d+ MB free in "
                                        rf"{tmp_path}\); free some space .* resume="):
        save_checkpoint(tmp_path / "best.pt", model, {}, 2, {"auc": 0.9})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and len(list(tmp_path.iterdir())) == 1

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(DataError, match=r"no space left to write .*metrics.json"):
        write_json({"a": 1}, tmp_path / "metrics.json")


def test_a_fold_that_cannot_fit_its_checkpoints_is_not_started(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights: about 40 MB for its fold's files
    monkeypatch.setattr(crossval.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 99e9, 30e6))
    with pytest.raises(DataError, match=rf"fold 2 needs about 40 MB in {tmp_path} for its checkpoints and 30 MB"):
        crossval._check_free_space(tmp_path, model, 2)
    monkeypatch.setattr(crossval.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 50e9, 50e9))
    crossval._check_free_space(tmp_path, model, 2)  # enough: no error


def test_a_finite_but_exploding_loss_stops_the_fold_with_one_line(tiny_data: Path, tmp_path: Path) -> None:
    # Adam at lr 1e6: losses stay finite and huge; before, the run ended with exit 0 and AUC 0.5
    with pytest.raises(NonFiniteLossError, match=r"fold 0, epoch 1: training diverged \(mean loss .*over 100x a "
                                                 r"classifier at chance's 0.693\); lower optimizer.lr \(now 1e\+06\)"):
        train(make_config([f"data.root={tiny_data}", *TINY, "recipe=seed", "optimizer.lr=1e6", "trainer.epochs=2",
                           "cv.folds=2", "audit.enabled=false"]), tmp_path / "run")


def test_weights_that_lack_tensors_of_the_model_are_refused_unless_asked(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    state = create_model("test_efficientnet").state_dict()
    partial = {k: v for i, (k, v) in enumerate(state.items()) if i % 3}  # a third of the body is missing
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match=rf"partial.pt lacks \d+ of the {len(state)} tensors of test_efficientnet "
                                           r"\(conv_stem.weight, .*model.strict_weights=false"):
        create_model("test_efficientnet", weights=str(tmp_path / "partial.pt"))
    with caplog.at_level(logging.WARNING):
        model = create_model("test_efficientnet", weights=str(tmp_path / "partial.pt"), strict_weights=False)
    assert "missing key(s): conv_stem.weight" in caplog.text
    key = next(iter(partial))
    assert torch.equal(model.state_dict()[key], partial[key])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_eval_predict_and_bench_stop_on_a_signal_with_one_line(sig: signal.Signals,
                                                               capsys: pytest.CaptureFixture) -> None:
    def work() -> None:  # what melanoma-eval does while it scores, when Ctrl-C or SLURM's SIGTERM arrives
        os.kill(os.getpid(), sig)
        time.sleep(5)
        raise AssertionError("the signal did not stop the work")

    before = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as a console script starts with (earlier tests in this process may
    # have changed it: loader workers and Hydra install handlers of their own)
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            report_user_errors("melanoma-eval", work)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert exit_info.value.code == 128 + sig
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"melanoma-eval: interrupted by {sig.name}; every file it finished is complete (written "
                   "atomically), the rest was not written: run it again"]
    assert signal.getsignal(signal.SIGTERM) == before  # handed back


def test_the_log_file_records_the_table_and_the_error(tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    log_file = logging.FileHandler(tmp_path / "train.log")  # what Hydra's job logging attaches
    logging.getLogger().addHandler(log_file)
    try:
        train(make_config([f"data.root={tiny_data}", *TINY, "trainer.epochs=1", "cv.folds=2"]), tmp_path / "run")
        with pytest.raises(SystemExit):
            report_user_errors("melanoma-train", train, make_config([f"data.root={tmp_path / 'nowhere'}", *TINY]),
                               tmp_path / "run2")
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    text = (tmp_path / "train.log").read_text()
    assert "audit: 0 test images" in text and "mean ± std" in text and "pooled out-of-fold: AUC" in text
    assert "melanoma-train: error: data.root=" in text  # the one line on stderr, kept for melanoma-report


def _corrupt(data: bytes, rng: random.Random, how: int) -> bytes:
    """JPEG bytes cut short (0), with bytes of the headers overwritten (1), or random bytes anywhere (2)."""
    data = bytearray(data)
    if how == 0:
        return bytes(data[:rng.randrange(len(data) // 2)])
    for _ in range(rng.randint(1, 20)):
        data[rng.randrange(min(600, len(data)) if how == 1 else len(data))] = rng.randrange(256)
    return bytes(data)


def _fully_decodes(path: Path) -> bool:
    """Decoded at full size by PIL: independent of the scan, which decodes JPEGs at a reduced scale."""
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except Exception:  # noqa: BLE001 - any failure at all counts as unreadable here
        return False
    return True


def test_corrupted_jpegs_never_crash_training_and_are_counted(tiny_data: Path, tmp_path: Path) -> None:
    """Fuzz: random corruptions of real-sized JPEGs; what the scan passes decodes, what it refuses is counted."""
    rng = random.Random(14)
    sources = sorted((DEMO_DATA / "isic-uda1").rglob("*.jpg"))[:8]
    for i in range(240):  # the scan itself never raises, and a file it passes always decodes for training
        path = tmp_path / f"fuzz{i}.jpg"
        path.write_bytes(_corrupt(rng.choice(sources).read_bytes(), rng, i % 3))
        if scan_images([str(path)], "skip") == []:
            assert decode_resized(path, 64).shape[0] == 3
        path.unlink()
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    victims = rng.sample(sorted((root / "train").rglob("*.jpg")), 12)
    for k, path in enumerate(victims):
        path.write_bytes(_corrupt(path.read_bytes(), rng, k % 3))
    unreadable = {str(p) for p in victims if not _fully_decodes(p)}
    assert len(unreadable) >= 4  # at least the four cut short
    metrics = train(make_config([f"data.root={root}", *TINY, "trainer.epochs=1", "cv.folds=2",
                                 "data.on_bad_file=skip"]), tmp_path / "run")
    assert {f["path"] for f in metrics["skipped_files"]} == unreadable and metrics["n_skipped"] == len(unreadable)
    assert metrics["n_images"] == len(list((root / "train").rglob("*.jpg"))) - len(unreadable)


def test_a_resume_whose_preprocessing_resolves_differently_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    """Another timm may resolve another crop or interpolation for the same model: the finished folds did not."""
    run, args = tmp_path / "run", [f"data.root={tiny_data}", *TINY, "trainer.epochs=1", "cv.folds=2",
                                   "audit.enabled=false"]
    train(make_config(args), run)
    recorded = json.loads((run / "preprocess.json").read_text())
    (run / "preprocess.json").write_text(json.dumps({**recorded, "crop_pct": 0.5}))  # as an older timm had it
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"preprocess.json records another preprocessing .*\(crop_pct: 0.5 -> "
                                          rf"{recorded['crop_pct']}; .*train into a new run directory"):
        train(make_config([*args, f"resume={run}"]), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing rewritten
    (run / "preprocess.json").write_text(json.dumps(recorded))
    assert train(make_config([*args, f"resume={run}"]), run)["folds"]  # the same preprocessing resumes


def test_worker_deaths_are_quieted_with_a_python_handler_not_sig_dfl() -> None:
    """A SIGCHLD pending under torch's handler would raise 'Signal 17 ignored due to race condition' if the
    handler were SIG_DFL by the time Python runs it (a flaky Ctrl-C traceback); a no-op handler never raises."""
    from melanoma.errors import ignore_signal, quiet_worker_deaths

    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    try:
        quiet_worker_deaths()
        assert signal.getsignal(signal.SIGCHLD) is ignore_signal
        os.kill(os.getpid(), signal.SIGCHLD)  # handled by the no-op: nothing raised, nothing printed
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_a_loader_worker_reports_errors_but_not_a_lost_connection_to_the_stopped_main_process() -> None:
    """The resource sharer reports through sys.excepthook: a reset connection (the main process stopped
    mid-handshake) is left out, any other error still reaches stderr. In a child process: it swaps hooks."""
    code = ("import sys; from melanoma.data import _ignore_stop_signals; _ignore_stop_signals(0)\n"
            "for exc in (ConnectionResetError(104, 'reset by peer'), EOFError(), ValueError('a real error')):\n"
            "    sys.excepthook(type(exc), exc, None)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError: a real error" in result.stderr
    assert "ConnectionResetError" not in result.stderr and "EOFError" not in result.stderr
