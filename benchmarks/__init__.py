"""Benchmarks, run as modules (``python -m benchmarks.<name>``); excluded from the test run."""
