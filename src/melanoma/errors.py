"""Errors a user can fix: each message names the key or file at fault and the way out.

Entry points print these as one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class MelanomaError(Exception):
    """Base class of the errors that are reported to the user as one line."""


class ConfigError(MelanomaError, ValueError):
    """A config key has a value that cannot work."""


class DataError(MelanomaError):
    """The data on disk does not match what the config says."""


class WeightsError(MelanomaError):
    """Model weights cannot be created or loaded."""


class TrainingInterrupted(BaseException):
    """A termination signal arrived; a BaseException so that no ``except Exception`` swallows it."""


class NonFiniteLossError(MelanomaError):
    """Training diverged: the loss became NaN or infinite."""


def report_user_errors(prog: str, func: Callable[..., T], *args: Any, multirun: bool = False) -> T:
    """Call ``func(*args)``; a :class:`MelanomaError` becomes one line on stderr and exit status 2.

    Every console entry point wraps its work in this, so users see ``prog: error: ...`` with
    the key or file and the fix, never a traceback, while real bugs keep theirs. In a Hydra
    multirun the error is logged and re-raised instead: Hydra then marks that job failed, runs
    the remaining points of the sweep, and reports the failure at the end.
    """
    try:
        return func(*args)
    except MelanomaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        if multirun:
            logging.getLogger(prog).error("%s", exc)
            raise
        raise SystemExit(2) from None
