"""The error family qsweep raises for bad input (the CLI prints these without a traceback), and the
stop signal as an exception."""

import signal


class QsweepError(ValueError):
    """Bad input: the message names the key or file, the bad value and what is allowed."""


class ConfigError(QsweepError):
    """A configuration value is not allowed. The message names the key, value and choices."""


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal (SIGTERM from ``timeout``, ``kill`` or a scheduler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame=None) -> None:
    """The stop signal's handler: raise :class:`Interrupted`, and again every second until
    :func:`interruption_taken`. Python prints and drops an exception raised while a finalizer or
    weakref callback runs (SQLAlchemy's, say), which would leave the job running as if not stopped."""
    signal.signal(signal.SIGALRM, lambda _, f: raise_interrupted(signum, f))
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    raise Interrupted(signum)


def interruption_taken() -> None:
    """A handler has caught :class:`Interrupted`: no more repeats (they would cut its clean-up short)."""
    signal.setitimer(signal.ITIMER_REAL, 0)
