"""Benchmarks: throughput, memory, and quality against TRL (see docs/measurements.md)."""
