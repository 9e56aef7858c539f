"""Benchmarks: speed and memory goals measured as ratios against a baseline in the same run."""
