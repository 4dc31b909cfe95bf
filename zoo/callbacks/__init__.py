"""Lightning callbacks of the zoo."""

from zoo.callbacks.dsa import DSAMonitor
from zoo.callbacks.predictions import PredictionWriter
from zoo.callbacks.qat import QATScheduleCallback
from zoo.callbacks.throughput import ThroughputMonitor

__all__ = ["DSAMonitor", "PredictionWriter", "QATScheduleCallback", "ThroughputMonitor"]
