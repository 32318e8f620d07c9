"""Metric models: the agent posts `flglm.protocol.StepMetricIn`; operators read `StepMetricView`."""

from flglm.protocol import StepMetricIn, StepMetricView

__all__ = ["StepMetricIn", "StepMetricView"]
