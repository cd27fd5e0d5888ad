"""The error family qsweep raises for bad input: the CLI prints these without a traceback."""


class QsweepError(ValueError):
    """Bad input: the message names the key or file, the bad value and what is allowed."""


class ConfigError(QsweepError):
    """A configuration value is not allowed. The message names the key, value and choices."""
