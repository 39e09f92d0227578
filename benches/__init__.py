"""Benchmarks that print tables and write JSON (never run as tests): `python -m benches.kernels`."""
