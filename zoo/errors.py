"""Errors a user can act on. ``python -m zoo`` prints them as one line, without a traceback."""


class ZooUserError(Exception):
    """A mistake in the user's input: configuration, data files or arguments. The message names what and where."""


class ConfigError(ZooUserError, ValueError):
    """A configuration value that cannot work (names the key)."""


class DataError(ZooUserError, ValueError):
    """A data file or folder that is missing, corrupt or inconsistent (names the file)."""


def check_sizes(owner: str, **sizes: float) -> None:
    """Raise a :class:`ConfigError` naming ``owner`` and the first of ``sizes`` (widths, depths, head counts, a
    ratio: keyword = value) that is not positive; integer sizes must be at least 1."""
    for key, value in sizes.items():
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"{owner}: {key}={value} must be at least 1")
        if not value > 0:
            raise ConfigError(f"{owner}: {key}={value} must be > 0")


def check_dropout(owner: str, dropout: float) -> None:
    """Raise a :class:`ConfigError` naming ``owner`` unless ``dropout`` is a probability in ``[0, 1)``."""
    if not 0 <= dropout < 1:
        raise ConfigError(f"{owner}: dropout={dropout} must be in [0, 1)")
