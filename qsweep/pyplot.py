"""matplotlib's pyplot, on the file-only Agg backend, imported when a figure is first drawn.

Importing it costs every ``python -m qsweep`` half a second, and most runs draw nothing.
"""

from __future__ import annotations


def pyplot():
    """The ``matplotlib.pyplot`` module, its backend set to Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
