"""Benchmarks: ``python -m bench [name ...]`` prints tables and writes JSON under bench/results/."""
