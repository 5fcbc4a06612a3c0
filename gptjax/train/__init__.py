"""Training: config, state, optimizer, pure steps, the loop, evaluation and metrics."""
