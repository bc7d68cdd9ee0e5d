"""The step layer: the Step contract, the default tape step, tape helpers, freezing,
parameter groups, schedules and metrics."""
