"""Benchmark scripts and their harness (not installed with the library)."""
