"""Errors a user can fix: each message names the key or file at fault and the way out.

Entry points print these as one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
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


class ExportError(MelanomaError):
    """An exported model file does not reproduce the run's own predictions, or cannot be written."""


class TrainingInterrupted(BaseException):
    """A termination signal arrived; a BaseException so that no ``except Exception`` swallows it."""


class NonFiniteLossError(MelanomaError):
    """Training diverged: the loss became NaN or infinite."""


def log_to_file(name: str, level: int, message: str) -> None:
    """Write ``message`` to the run's log files only (Hydra's ``train.log``, ...), not to the console.

    What an entry point prints for people (the results table, the one-line error) is recorded there
    too, so that a run's folder says how it ended; ``melanoma-report`` quotes a failed run's last error.
    """
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _Stopped(KeyboardInterrupt):
    """SIGTERM, turned into what Ctrl-C raises so that both stop the same way."""

    signum = signal.SIGTERM


def quiet_worker_deaths() -> None:
    """Stop torch reporting loader workers that die: called when a stop signal arrives.

    A signal to the process group also reaches loader workers that started an instant before and
    have not yet set themselves to ignore it; they die of it, which torch's SIGCHLD handler would
    report as a failure (a traceback on the way out). On the way out that death is expected.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, ignore_signal)


def ignore_signal(signum: int, frame: object) -> None:
    """A Python handler that does nothing, in place of ``SIG_DFL`` for SIGCHLD (whose default is to ignore it).

    A SIGCHLD that arrived while torch's handler was installed runs its Python handler a moment later; if the
    handler is ``SIG_DFL`` by then, CPython raises ``OSError: Signal 17 ignored due to race condition`` from
    whatever line runs (seen from ``child.kill()`` on the way out of a Ctrl-C). A no-op handler has no such race.
    """


# The stop a signal handler raised, kept until its catch_stop_signals block ends: Python prints and ignores an
# exception raised where it cannot propagate (an at-fork hook, such as the one logging runs in the parent
# after each loader worker's fork; a __del__; a weakref callback). A signal that lands there would be lost,
# and training would go on to its last epoch; the loops raise it again at their next batch instead.
_pending_stops: list[BaseException] = []


def _deliver(stop: BaseException) -> None:
    quiet_worker_deaths()
    _pending_stops.append(stop)
    raise stop


def raise_if_stopped() -> None:
    """Raise once more a stop signal's exception that Python swallowed; the loops call this at every batch.

    Raises:
        TrainingInterrupted, KeyboardInterrupt: a SIGTERM or SIGINT arrived since its handler was installed.
    """
    if _pending_stops:
        raise _pending_stops[0]


def interrupt_training(signum: int, frame: object) -> None:
    """melanoma-train's handler of SIGTERM and SIGINT: raises :class:`TrainingInterrupted`."""
    _deliver(TrainingInterrupted(signal.Signals(signum).name))


@contextlib.contextmanager
def catch_stop_signals(handler: Callable[[int, object], None],
                       signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, ``signals`` call ``handler``; after it the previous handlers are back and the stop is
    forgotten (it was handled), so that later work in the same process is not stopped by it again.
    Python's report of a stop it swallowed is left out (:func:`raise_if_stopped` raises it again), others stay."""
    _pending_stops.clear()
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    report = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if unraisable.exc_value in _pending_stops else report(unraisable)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        sys.unraisablehook = report
        _pending_stops.clear()


def _raise_stopped(signum: int, frame: object) -> None:
    _deliver(_Stopped())


def report_user_errors(prog: str, func: Callable[..., T], *args: Any, multirun: bool = False) -> T:
    """Call ``func(*args)``; a :class:`MelanomaError` becomes one line on stderr and exit status 2.

    Every console entry point wraps its work in this, so users see ``prog: error: ...`` with
    the key or file and the fix, never a traceback, while real bugs keep theirs; Ctrl-C and SIGTERM
    give one line and exit status 128 + signal. In a Hydra
    multirun the error is logged and re-raised instead: Hydra then marks that job failed, runs
    the remaining points of the sweep, and reports the failure at the end.
    """
    # Ctrl-C and SIGTERM (timeout, SLURM) stop with one line too, where no entry point took them over
    # (melanoma-train installs its own, which names the resume command).
    own_term = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    catching = catch_stop_signals(_raise_stopped, (signal.SIGTERM,)) if own_term else contextlib.nullcontext()
    try:
        with catching:
            return func(*args)
    except MelanomaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        if multirun:
            logging.getLogger(prog).error("%s", exc)
            raise
        log_to_file(prog, logging.ERROR, f"{prog}: error: {exc}")
        raise SystemExit(2) from None
    except KeyboardInterrupt as exc:
        quiet_worker_deaths()
        signum = getattr(exc, "signum", signal.SIGINT)
        message = (f"{prog}: interrupted by {signal.Signals(signum).name}; every file it finished is complete "
                   "(written atomically), the rest was not written: run it again")
        print(message, file=sys.stderr)
        log_to_file(prog, logging.WARNING, message)
        raise SystemExit(128 + signum) from None
