"""Lightning callbacks of the zoo."""

from zoo.callbacks.dsa import DSAMonitor
from zoo.callbacks.qat import QATScheduleCallback

__all__ = ["DSAMonitor", "QATScheduleCallback"]
