"""Measuring: benchmarks and their reports, the engines they time, evaluation, comparison, precision search."""
