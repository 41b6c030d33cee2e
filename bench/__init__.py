"""genkern benchmarks: `python -m bench` (report) and `pytest bench --benchmark-only` (pytest-benchmark)."""
