"""Benchmarks: detection quality and speed, each writing its section of docs/benchmarks.md."""
