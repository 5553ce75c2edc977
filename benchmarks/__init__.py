"""Benchmarks: throughput, memory, and quality against TRL (see README)."""
