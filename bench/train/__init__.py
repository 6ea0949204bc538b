"""Training runs: spec, columns, the loop (run), evaluation, data, checkpoints, distributed, impl choice."""
