from bench.harness import steady_cpu_allocator


def pytest_configure(config):
    # the same steady allocator as `python -m bench` (see harness.steady_cpu_allocator)
    steady_cpu_allocator()
