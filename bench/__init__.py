"""genkern benchmarks: `python -m bench` (report) and `pytest bench --benchmark-only` (pytest-benchmark)."""
import os

# Inductor's pool of compile worker processes would otherwise keep the 2 cores of a small machine
# busy while the timings run; compile in-process instead.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
