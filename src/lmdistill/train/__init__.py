"""Training: the loop, checkpoints, process groups and metrics."""
