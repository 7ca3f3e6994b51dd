"""The layout: imports point one way (cli -> reporting -> core -> libraries), and the core runs without Hydra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import melanoma

PACKAGE = Path(melanoma.__file__).resolve().parent
CORE = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
REPORTING = sorted((PACKAGE / "reporting").glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _offenders(paths: list[Path], banned: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in banned or m.startswith(banned))
        if bad:
            out[path.name] = bad
    return out


def test_the_core_imports_neither_cli_nor_reporting_nor_hydra() -> None:
    assert len(CORE) >= 18 and {"crossval.py", "gradcam.py", "data.py", "engine.py"} <= {p.name for p in CORE}
    assert _offenders(CORE, ("melanoma.cli", "melanoma.reporting", "hydra", "omegaconf")) == {}


def test_reporting_reads_files_not_configs_checkpoints_or_entry_points() -> None:
    assert {p.name for p in REPORTING} >= {"runs.py", "tables.py", "figures.py", "pdf.py"}
    assert _offenders(REPORTING, ("melanoma.cli", "hydra", "omegaconf", "melanoma.checkpoint.load_checkpoint",
                                  "melanoma.models", "melanoma.inference", "torch")) == {}
    for path in REPORTING:  # no checkpoint is loaded, whatever the import style
        assert "load_checkpoint" not in path.read_text() and "torch.load" not in path.read_text(), path.name


def test_the_offender_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from omegaconf import OmegaConf\n    import melanoma.cli.train\n")
    assert _offenders([bad], ("melanoma.cli", "omegaconf")) == {"bad.py": ["melanoma.cli.train", "omegaconf"]}


def test_importing_the_core_does_not_import_hydra() -> None:
    core = ", ".join(f"melanoma.{p.stem}" for p in CORE)
    code = f"import sys, {core}, melanoma.reporting.pdf, melanoma.reporting.figures\n" \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_console_script_lives_in_cli() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = PACKAGE.parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert set(scripts) == {f"melanoma-{n}" for n in ("train", "eval", "audit", "predict", "synth", "report",
                                                      "explain", "bench", "stack", "compare", "export")}
    assert all(target.startswith("melanoma.cli.") and target.endswith(":main") for target in scripts.values())
