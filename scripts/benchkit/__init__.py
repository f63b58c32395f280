"""Modules of `scripts/bench.py`: processes, paths and load loops, phases, profile, report."""
