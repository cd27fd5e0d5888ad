"""The error family qsweep raises for bad input: the CLI prints these without a traceback."""


class QsweepError(ValueError):
    """Bad input: the message names the key or file, the bad value and what is allowed."""
