"""The generic training loop and what it owns: state, optimizer, step, checkpoints, metrics."""
