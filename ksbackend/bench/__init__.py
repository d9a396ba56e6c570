"""Benchmarks users run: ``python -m ksbackend.bench --help``."""
