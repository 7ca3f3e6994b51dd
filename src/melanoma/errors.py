"""Errors a user can fix: each message names the key or file at fault and the way out.

Entry points print these as one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""


class MelanomaError(Exception):
    """Base class of the errors that are reported to the user as one line."""


class ConfigError(MelanomaError, ValueError):
    """A config key has a value that cannot work."""


class DataError(MelanomaError):
    """The data on disk does not match what the config says."""


class WeightsError(MelanomaError):
    """Model weights cannot be created or loaded."""
