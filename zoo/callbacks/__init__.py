"""Lightning callbacks of the zoo."""

from zoo.callbacks.dsa import DSAMonitor

__all__ = ["DSAMonitor"]
