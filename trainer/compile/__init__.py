"""The compile layer: the compile plan, the executions it builds, pacing and calibration."""
