"""Timing sweeps: the case grid (sweep), the run folder (run), shards over GPUs, profiles, run comparison."""
