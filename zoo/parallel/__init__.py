"""Training across devices: the adaptive choice of strategy, tensor-parallel and FSDP application, batch adjustment."""

from zoo.parallel.batch_adjustment import BatchPlan, DynamicBatchAdjustment, plan_accumulation
from zoo.parallel.plan import ParallelPlan, select_parallelism

__all__ = ["BatchPlan", "DynamicBatchAdjustment", "ParallelPlan", "plan_accumulation", "select_parallelism"]
