"""Where a run came from: the code's version and git commit, and the versions of what it ran on.

``melanoma-train`` writes this as ``provenance.json`` in the run directory when the run starts, so a
model card (:mod:`melanoma.reporting.model_card`) or a tracking server can say how to reproduce it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

from melanoma import __version__

PACKAGES = ("torch", "torchvision", "timm", "hydra-core", "scikit-learn", "numpy")


def git_commit(where: str | Path | None = None) -> tuple[str | None, bool | None]:
    """The commit checked out where the package's code lives, and whether the tree has changes.

    Only a checkout that tracks this very file counts: an installed copy inside some other repository
    (a virtual environment in a project's folder) has no commit of its own.

    Returns:
        ``(sha, dirty)``, or ``(None, None)`` for an install that is not a git checkout (or no git).
    """
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        subprocess.run(["git", "-C", str(where), "ls-files", "--error-unmatch", Path(__file__).name],
                       capture_output=True, timeout=10, check=True)
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha or None, bool(status.strip())


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``melanoma``, Python and each installed package's version (a missing package is left out)."""
    found = {"melanoma": __version__, "python": platform.python_version()}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def provenance() -> dict:
    """The commit, whether the checkout had uncommitted changes, and the versions."""
    sha, dirty = git_commit()
    return {"commit": sha, "dirty": dirty, "versions": versions()}
