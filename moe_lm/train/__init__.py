"""Training: the loop, optimizer and schedule, the run directory, metrics and logging sinks."""
