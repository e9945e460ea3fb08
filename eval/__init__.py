"""Benchmark runners."""
