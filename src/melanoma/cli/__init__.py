"""The console entry points: the only modules that read a Hydra config.

Each module composes its config from :mod:`melanoma.configs`, checks it, unpacks it into plain
arguments and calls the core (``melanoma.data``, ``melanoma.crossval``, ``melanoma.inference``, ...)
or :mod:`melanoma.reporting`. Importing this package registers the resolvers the config tree uses.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from melanoma.data import DEMO_DATA
from melanoma.errors import ConfigError, MelanomaError


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ${melanoma_demo_data:NAME}: a real demo set shipped inside the package, wherever it is installed.
OmegaConf.register_new_resolver("melanoma_demo_data", lambda name: str(DEMO_DATA / name), replace=True)
# hydra.run.dir is the resumed run's directory when resume= is set, else a new dated one. Under
# torchrun only rank 0 writes Hydra's .hydra/ folder, and other ranks log to train.rank{N}.log.
OmegaConf.register_new_resolver("melanoma_run_dir", lambda resume, new: resume or new, replace=True)
OmegaConf.register_new_resolver("melanoma_rank0_only", lambda value: value if _env_rank() == 0 else None,
                                replace=True)
# melanoma-explain's and melanoma-export's folders hold their files next to their .hydra/ and log:
# out=, else RUN_DIR/explain or RUN_DIR/export of the run that ckpt= names.
def _output_dir(ckpt: str, out: str | None, name: str) -> str:
    from melanoma.inference import run_dir_of

    return str(out or run_dir_of(ckpt) / name)


OmegaConf.register_new_resolver("melanoma_output_dir", _output_dir, replace=True)


def _config_groups(config_name: str) -> str:
    """The help's "Configuration groups" section for one command: only the groups in its own defaults list, with
    their options (Hydra's ``$APP_CONFIG_GROUPS`` lists every group of the tree, those the command refuses too)."""
    from pathlib import Path

    import melanoma.configs

    root = Path(melanoma.configs.__file__).parent
    entries = OmegaConf.load(root / f"{config_name}.yaml").get("defaults", [])
    groups = sorted(str(key) for entry in entries if isinstance(entry, DictConfig) for key in entry
                    if not str(key).startswith(("hydra", "override")))
    lines = [f"{group}: {', '.join(sorted(p.stem for p in (root / group).glob('*.yaml')))}" for group in groups]
    return "\n".join(["== Configuration groups ==", "Compose your configuration from those groups (group=option)", "",
                      *(lines or ["(none: every key is in the config below)"])])


# ${melanoma_config_groups:NAME}: in the help template every command shares (configs/hydra/help/melanoma.yaml).
OmegaConf.register_new_resolver("melanoma_config_groups", _config_groups, replace=True)
OmegaConf.register_new_resolver("melanoma_rank_suffix", lambda: f".rank{_env_rank()}" if _env_rank() else "",
                                replace=True)

# What a mandatory (???) key wants, for the one-line error when it is left out.
_REQUIRED = {"ckpt": "ckpt=RUN_DIR (a melanoma-train run folder) or ckpt=RUN_DIR/foldK/best.pt",
             "input": "input=IMAGE_OR_FOLDER", "data.manifest": "data.manifest=CSV (columns path,label[,split])"}
_HYDRA_FLAGS_WE_CHECK = ("-m", "--multirun")


def _sweep_points(argv: list[str], multirun: bool) -> list[list[str]]:
    """Command lines that between them use every value of every swept key once (``a=1,2 b=x,y``: ``a=1 b=x``,
    ``a=2 b=x``, ``a=1 b=y``), so a typo in any value of a sweep is found before its first job starts.
    An interval (``interval(1e-5, 1e-2)``, Optuna's search space) has no values to list: the sampler draws them,
    and its two ends are checked."""
    if not multirun:
        return [argv]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    parsed = OverridesParser.create().parse_overrides(argv)
    choices = [[f"{o.get_key_element()}={v:g}" for v in (o.value().start, o.value().end)]  # 16.0 as 16
               if isinstance(o.value(), IntervalSweep) else
               [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [text]
               for o, text in zip(parsed, argv, strict=True)]
    base = [values[0] for values in choices]
    points = [base]
    for i, values in enumerate(choices):
        points += [base[:i] + [value] + base[i + 1:] for value in values[1:]]
    return points


def _preset_multirun(argv: list[str], config_name: str) -> bool:
    """Whether the command line, without its sweeps, selects a preset with ``hydra.mode: MULTIRUN``
    (``hparams=seed_grid``, ``hparams=optuna``): Hydra then sweeps without ``-m``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(argv)
    except HydraException:
        return False  # the parse error is reported by the composition that follows
    plain = [text for o, text in zip(parsed, argv, strict=True) if not o.is_sweep_override()]
    if len(plain) == len(argv):
        return False
    with initialize_config_module("melanoma.configs", version_base="1.3"):
        cfg = compose(config_name, overrides=plain, return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.mode")).endswith("MULTIRUN")  # RunMode.MULTIRUN or its name


def _composition_error(exc: Exception, config_name: str) -> str:
    """Hydra's multi-line composition error as one line that names the valid choices."""
    text = str(exc)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        if group == "hydra/sweeper" and option == "optuna":
            return "hparams=optuna needs Hydra's Optuna sweeper: pip install 'melanoma[optuna]'"
        close = difflib.get_close_matches(option, options, n=3)
        return (f"{group}={option} is not an option of {group} (close: {', '.join(close) or 'none'}); "
                f"the options are {', '.join(options)}")
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        with initialize_config_module("melanoma.configs", version_base="1.3"):
            node = compose(config_name)
        parts = unknown.group(1).split(".")
        depth = 0  # name the first part that is missing: augmentaton.vignette is a typo in the group, not the key
        while depth < len(parts) - 1 and parts[depth] in list(node.keys()):
            if OmegaConf.is_missing(node, parts[depth]) or not isinstance(node[parts[depth]], DictConfig):
                value = ".".join(parts[:depth + 1])
                return f"{value} is a value, not a group of keys: set {value}=VALUE, not {unknown.group(1)}"
            node, depth = node[parts[depth]], depth + 1
        key, parent = ".".join(parts[:depth + 1]), ".".join(parts[:depth])
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(parts[depth], keys, n=3)
        where = f"a key of {parent}" if parent else "a top-level key"
        return f"{key} is not {where} (close: {', '.join(close) or 'none'}); the keys are {', '.join(keys)}"
    lines = [line.strip() for line in text.split("Config search path")[0].splitlines()
             if line.strip() and not line.strip().startswith("See https://")]
    return "; ".join(lines)


def check_overrides(prog: str, config_name: str, argv: list[str] | None = None,
                    preflight: Callable[[DictConfig], object] | None = None) -> None:
    """Compose the config as Hydra is about to, so that a mistake in the command line is one line and exit 2.

    Every key is then checked against the CLI's schema (:mod:`melanoma.cli.schema`): types, ranges,
    choices and unknown keys, before Hydra creates the run folder. Hydra itself prints an unknown
    group option, an unknown key or a missing mandatory value over several lines (or a traceback)
    and exits with 1. Command lines with Hydra flags other than ``-m``/``--multirun`` (``--help``,
    ``--cfg``, ``--config-name``, ...) are left to Hydra.

    Args:
        prog: the command, for the message.
        config_name: its top-level config.
        argv: the command line; ``None`` is ``sys.argv[1:]``.
        preflight: called with each composed config; a :class:`MelanomaError` it raises (e.g. a ``ckpt=``
            that does not exist) is one line too, so a mistake in a path leaves no output folder behind.
    """
    from melanoma.cli.schema import validate  # imports the modules whose choices it checks

    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if a not in _HYDRA_FLAGS_WE_CHECK]
    if any(a.startswith("-") for a in overrides):
        return
    try:
        multirun = len(overrides) < len(argv) or _preset_multirun(overrides, config_name)
        with initialize_config_module("melanoma.configs", version_base="1.3"):
            for point in _sweep_points(overrides, multirun=multirun):
                cfg = compose(config_name, overrides=point)
                for key in sorted(OmegaConf.missing_keys(cfg)):
                    _fail(prog, f"{key} is required: pass {_REQUIRED.get(key, key + '=VALUE')} (see {prog} --help)")
                validate(cfg, config_name)
                if preflight is not None:
                    preflight(cfg)
    except HydraException as exc:
        _fail(prog, _composition_error(exc, config_name))
    except ConfigError as exc:
        _fail(prog, f"{exc} (see {prog} --help)")
    except MelanomaError as exc:
        _fail(prog, str(exc))
    except OmegaConfBaseException as exc:  # e.g. an interpolation ${...} in an override that does not resolve
        key = getattr(exc, "full_key", None)
        _fail(prog, f"{key + ': ' if key else ''}{str(exc).splitlines()[0]}; check the overrides")


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a plain (non-Hydra) command, its help the module docstring's title line and examples."""
    usage = "\n\n".join(doc.split("\n\n")[:2]).replace("``", "")
    return argparse.ArgumentParser(prog=prog, description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
