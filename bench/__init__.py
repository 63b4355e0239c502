"""Benchmarks, each a script run as `python bench/<name>.py` (see bench/README.md); shared helpers in common.py."""
