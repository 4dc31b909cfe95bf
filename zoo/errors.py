"""Errors a user can act on. ``python -m zoo`` prints them as one line, without a traceback."""


class ZooUserError(Exception):
    """A mistake in the user's input: configuration, data files or arguments. The message names what and where."""


class ConfigError(ZooUserError, ValueError):
    """A configuration value that cannot work (names the key)."""


class DataError(ZooUserError, ValueError):
    """A data file or folder that is missing, corrupt or inconsistent (names the file)."""
